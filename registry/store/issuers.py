"""Which issuing CA the fleet's live certificates come from (issue 26: rollover).

A certificate names its issuing CA by its Authority Key Identifier (the issuer's key id,
:func:`factory.issuers.authority_key_id`). Read from the stored PEMs of live, unexpired
certificates: used by the expiry report (devices per issuing CA), ``certfleet ca issuers``
and ``certfleet ca retire`` (an issuing CA is retired only when none of its certificates is
live).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from cryptography import x509
from sqlmodel import Session, col, select

from factory.issuers import authority_key_id
from fleetcore.clock import utcnow
from registry.db import write_transaction
from registry.models import Certificate, Device
from registry.store.audit import Actor, add_entry
from registry.store.revocations import announce, append_feed_event, mark_revoked

__all__ = ["IssuerUse", "issuer_use", "revoke_issuer_certificates"]


@dataclass
class IssuerUse:
    """Per issuing CA key id: live certificates, and active devices whose newest live
    certificate it signed (where the device *is*)."""

    certificates: Counter[str] = field(default_factory=Counter)
    devices: Counter[str] = field(default_factory=Counter)
    #: device id -> key id of the issuing CA of its newest live certificate
    device_issuer: dict[str, str] = field(default_factory=dict)

    def devices_on(self, key_id: str) -> list[str]:
        """The active devices on the issuing CA ``key_id`` (or a prefix of it), sorted."""
        wanted = key_id.lower().replace(":", "")
        return sorted(d for d, k in self.device_issuer.items() if k.startswith(wanted))


def issuer_use(session: Session, now: dt.datetime) -> IssuerUse:
    """Count live, unexpired certificates and active devices by issuing CA."""
    rows = session.exec(
        select(Certificate.device_id, Certificate.not_after, Certificate.certificate_pem)
        .join(Device, col(Device.device_id) == col(Certificate.device_id))
        .where(col(Certificate.status) == "live")
        .where(col(Certificate.not_after) > now)
        .where(col(Device.status) == "active")
    ).all()
    use = IssuerUse()
    newest: dict[str, tuple[dt.datetime, str]] = {}
    for device_id, not_after, pem in rows:
        try:
            key_id = authority_key_id(x509.load_pem_x509_certificate(pem.encode())) or "unknown"
        except ValueError:
            key_id = "unknown"
        use.certificates[key_id] += 1
        seen = newest.get(device_id)
        if seen is None or not_after > seen[0]:
            newest[device_id] = (not_after, key_id)
    use.device_issuer = {device_id: key_id for device_id, (_, key_id) in newest.items()}
    use.devices.update(use.device_issuer.values())
    return use


def revoke_issuer_certificates(
    session: Session, key_id: str, actor: Actor, reason: str
) -> tuple[int, list[str]]:
    """Revoke every live certificate the issuing CA ``key_id`` signed and append one
    ``issuer_revoked`` feed event (one transaction); (its seq, the serials). The devices stay
    active: they get a new certificate only by re-enrollment or a claim (docs/factory.md)."""
    with write_transaction(session):
        now = utcnow()
        live = session.exec(select(Certificate).where(col(Certificate.status) == "live")).all()
        revoked = []
        for certificate in live:
            try:
                parsed = x509.load_pem_x509_certificate(certificate.certificate_pem.encode())
            except ValueError:
                continue
            if authority_key_id(parsed) != key_id:
                continue
            mark_revoked(session, [certificate], now, "unspecified")
            revoked.append(certificate.serial)
        session.flush()
        seq = append_feed_event(
            session,
            subject=key_id,
            serials=sorted(revoked),
            reason=reason,
            reason_code="unspecified",
            now=now,
            actor=actor,
            kind="issuer_revoked",
        )
        add_entry(
            session,
            actor,
            "revoke_issuing",
            key_id,
            {"reason": reason, "certificates": len(revoked), "seq": seq},
        )
        announce(session, seq)
    return seq, sorted(revoked)
