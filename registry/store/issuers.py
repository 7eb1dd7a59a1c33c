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
from sqlalchemy import delete
from sqlmodel import Session, col, select

from factory.issuers import authority_key_id
from fleetcore.clock import utcnow
from registry.db import write_transaction
from registry.models import Certificate, ConsoleSession, Device, Revocation
from registry.store.audit import Actor, add_entry
from registry.store.revocations import announce, append_feed_event, mark_revoked

__all__ = [
    "ISSUER_REVOKED",
    "IssuerUse",
    "issuer_revoked_at",
    "issuer_use",
    "revoke_issuer_certificates",
]

#: The feed event kind of a revoked issuing CA; its ``device_id`` column holds the CA's key id.
ISSUER_REVOKED = "issuer_revoked"


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
    active: they get a new certificate only by re-enrollment or a claim (docs/factory.md).

    Every console session opened with a client certificate ends in the same transaction
    (a session does not record its certificate's issuing CA): operators sign in again, and
    a certificate of the revoked CA is refused then (:mod:`registry.issuer_revocations`)."""
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
            kind=ISSUER_REVOKED,
        )
        ended = session.execute(
            delete(ConsoleSession).where(col(ConsoleSession.via) == "mtls")
        ).rowcount  # type: ignore[attr-defined]
        add_entry(
            session,
            actor,
            "revoke_issuing",
            key_id,
            {
                "reason": reason,
                "certificates": len(revoked),
                "seq": seq,
                "console_sessions_ended": ended,
            },
        )
        announce(session, seq)
    return seq, sorted(revoked)


def issuer_revoked_at(session: Session, key_id: str) -> dt.datetime | None:
    """When the issuing CA ``key_id`` was revoked (its ``issuer_revoked`` feed event), or
    None. One lookup on the feed's indexed ``device_id`` column."""
    return session.exec(
        select(Revocation.revoked_at)
        .where(col(Revocation.device_id) == key_id.lower())
        .where(col(Revocation.kind) == ISSUER_REVOKED)
        .order_by(col(Revocation.seq))
        .limit(1)
    ).first()
