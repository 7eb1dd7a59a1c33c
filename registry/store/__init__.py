"""The registry's data layer: what it reads and writes, one module per resource.

- :mod:`registry.store.audit` — who did what (the audit log), and one device's trail;
- :mod:`registry.store.devices` — registration, listing and reading devices;
- :mod:`registry.store.revocations` — decommission and the revocation feed it appends to;
- :mod:`registry.store.certificates` — a certificate's status (OCSP), the CRL's entries and
  its number;
- :mod:`registry.store.renewals` — the renewal rate limit and recording a renewed certificate;
- :mod:`registry.store.supersede` — renewal confirms and the revocation of superseded
  certificates after the grace;
- :mod:`registry.store.expiry` — the fleet's expiry over current certificates (gauges, report);
- :mod:`registry.store.stats` — counts and expiries per week;
- :mod:`registry.store.telemetry` — last-seen and last telemetry of devices;
- :mod:`registry.store.tokens` — operators' bearer tokens;
- :mod:`registry.store.counters` — the database counters (feed sequence, CRL number, epoch);
- :mod:`registry.store.console` — what the console's pages read (overview, a device's history);
- :mod:`registry.store.console_sessions` — console sessions and failed sign-ins.

Functions take an open :class:`sqlmodel.Session`; the writing ones run in
:func:`registry.db.write_transaction` and commit, so each is atomic. What must happen after
a commit (feed wake-up, metrics, CRL re-sign) is :mod:`registry.operations`' job.
"""

from __future__ import annotations

__all__: list[str] = []
