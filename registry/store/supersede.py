"""Superseded certificates: a renewed device's confirm schedules its older live certificates
for revocation, and what is due is revoked (reason ``superseded``), one feed event of kind
``superseded`` per device.

The schedule is ``certificate.supersede_at`` (index) and ``superseded_by``; the confirm is
``certificate.confirmed_at`` (migration 0006). What must happen after a commit (feed
wake-up, CRL re-sign, metrics) is :mod:`registry.operations`' and :mod:`registry.supersede`'s
job.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from sqlmodel import Session, col, select

from fleetcore.clock import utcnow
from fleetcore.renewal_wire import RefusalCode
from registry.db import write_transaction
from registry.errors import ConfirmRefusedError, DecommissionedDeviceError, NotFoundError
from registry.models import Certificate, Device
from registry.store.audit import Actor, add_entry
from registry.store.revocations import append_feed_event

__all__ = [
    "BATCH",
    "ConfirmResult",
    "SupersededRevocation",
    "confirm_certificate",
    "next_supersede_due",
    "revoke_due_superseded",
]

#: Certificates revoked per transaction by the worker.
BATCH: Final = 500
SUPERSEDED: Final = "superseded"


@dataclass(frozen=True, slots=True)
class ConfirmResult:
    serial: str
    #: older live certificates newly scheduled for revocation by this confirm.
    scheduled: list[str]
    supersede_at: dt.datetime | None


def confirm_certificate(
    session: Session,
    device_id: str,
    serial: str,
    *,
    grace: dt.timedelta,
    actor: Actor,
    now: dt.datetime | None = None,
) -> ConfirmResult:
    """Record that ``device_id`` uses certificate ``serial`` and schedule its older live
    certificates for revocation at now + ``grace`` (one write transaction). Raises
    NotFoundError, DecommissionedDeviceError or ConfirmRefusedError (its ``refusal``: the
    wire code) when the confirm is not valid."""
    with write_transaction(session):
        return _confirm(session, device_id, serial, grace, actor, now or utcnow())


def _confirm(
    session: Session,
    device_id: str,
    serial: str,
    grace: dt.timedelta,
    actor: Actor,
    now: dt.datetime,
) -> ConfirmResult:
    device = session.exec(
        select(Device).where(Device.device_id == device_id).with_for_update()
    ).one_or_none()
    if device is None:
        raise NotFoundError(f"device {device_id} is not registered")
    if device.status != "active":
        raise DecommissionedDeviceError(f"device {device_id} is decommissioned; nothing to confirm")
    certificates = list(
        session.exec(select(Certificate).where(Certificate.device_id == device_id)).all()
    )
    confirmed = next((c for c in certificates if c.serial == serial), None)
    if confirmed is None:
        raise ConfirmRefusedError(
            RefusalCode.UNKNOWN_SERIAL,
            f"device {device_id} has no certificate with serial {serial}",
        )
    if confirmed.status != "live":
        raise ConfirmRefusedError(
            RefusalCode.CERTIFICATE_REVOKED, f"certificate {serial} is revoked"
        )
    newest = max(certificates, key=lambda c: (c.not_before, c.not_after, c.serial))
    if newest.serial != serial:
        raise ConfirmRefusedError(
            RefusalCode.NOT_NEWEST,
            f"certificate {serial} is not device {device_id}'s newest ({newest.serial}); "
            "confirm the newest certificate",
        )
    due = now + grace
    scheduled = []
    for older in certificates:
        if older.serial == serial or older.status != "live" or older.supersede_at is not None:
            continue
        older.supersede_at, older.superseded_by = due, serial
        session.add(older)
        scheduled.append(older.serial)
    first = confirmed.confirmed_at is None
    if first:
        confirmed.confirmed_at = now
        session.add(confirmed)
    if first or scheduled:
        add_entry(
            session,
            actor,
            "confirm",
            device_id,
            {"serial": serial, "superseded": scheduled, "supersede_at": due.isoformat()},
        )
    return ConfirmResult(serial, scheduled, due if scheduled else None)


@dataclass(frozen=True, slots=True)
class SupersededRevocation:
    """One feed event appended by :func:`revoke_due_superseded`."""

    seq: int
    device_id: str
    serials: list[str]


def revoke_due_superseded(
    session: Session, actor: Actor, *, now: dt.datetime | None = None, limit: int = BATCH
) -> list[SupersededRevocation]:
    """Revoke (reason superseded) up to ``limit`` certificates whose ``supersede_at`` has
    come, one feed event and one audit entry per device, in one write transaction."""
    with write_transaction(session):
        return _revoke_due(session, actor, now or utcnow(), limit)


def _revoke_due(
    session: Session, actor: Actor, now: dt.datetime, limit: int
) -> list[SupersededRevocation]:
    # Only supersede_at in the WHERE clause: its index is the range; rows revoked since (a
    # decommission) are filtered here and their due time cleared.
    due = list(
        session.exec(
            select(Certificate)
            .where(col(Certificate.supersede_at) <= now)
            .order_by(col(Certificate.supersede_at), col(Certificate.serial))
            .limit(limit)
            .with_for_update()
        ).all()
    )
    by_device: dict[str, list[Certificate]] = {}
    for certificate in due:
        by_device.setdefault(certificate.device_id, []).append(certificate)
    done: list[SupersededRevocation] = []
    for device_id in sorted(by_device):
        certificates = by_device[device_id]
        device = session.exec(
            select(Device).where(Device.device_id == device_id).with_for_update()
        ).one()
        live = [c for c in certificates if c.status == "live" and device.status == "active"]
        for certificate in certificates:
            certificate.supersede_at = None
            if certificate in live:
                certificate.status = "revoked"
                certificate.revoked_at = now
                certificate.revocation_reason = SUPERSEDED
            session.add(certificate)
        if not live:
            continue
        serials = sorted(c.serial for c in live)
        by = sorted({c.superseded_by or "?" for c in live})
        seq = append_feed_event(
            session,
            subject=device_id,
            serials=serials,
            reason=f"superseded by {','.join(by)}",
            reason_code=SUPERSEDED,
            now=now,
            actor=actor,
            kind=SUPERSEDED,
        )
        add_entry(
            session, actor, "supersede", device_id, {"serials": serials, "by": by, "seq": seq}
        )
        done.append(SupersededRevocation(seq, device_id, serials))
    return done


def next_supersede_due(session: Session) -> dt.datetime | None:
    """The earliest scheduled supersession (None when nothing is scheduled)."""
    first = session.exec(
        select(Certificate.supersede_at)
        .where(col(Certificate.supersede_at).is_not(None))
        .order_by(col(Certificate.supersede_at))
        .limit(1)
    ).first()
    return first
