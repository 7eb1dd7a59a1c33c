"""Superseded certificates: a renewed device confirms its new certificate, the older ones are
revoked (reason ``superseded``) after a grace.

The device publishes ``{"confirm": "<serial of the new certificate, lower-case hex>"}`` on
``devices/<id>/cert/renew`` once it has connected with that certificate; the registry's
renewal worker (:class:`registry.renewal.RenewalService`) hands JSON payloads there to
:class:`Confirmer` and answers on ``devices/<id>/cert/issued`` with ``{"confirmed":
"<serial>"}`` or a refusal ``{"error": "<code>", "message": "<why>"}``:

- ``invalid_confirm``: not a JSON object with a hex ``confirm`` serial;
- ``unknown_device`` / ``device_decommissioned``;
- ``unknown_serial``: no certificate of this device has that serial;
- ``certificate_revoked``: that certificate is revoked;
- ``not_newest``: the device has a newer certificate (confirm that one).

A valid confirm records ``confirmed_at`` on the certificate and sets ``supersede_at`` = now +
grace (``CERTFLEET_REGISTRY_SUPERSEDE_GRACE_S``) on every other live certificate of the
device, in one transaction with one audit entry. Confirming again is answered the same way
and changes nothing (the earliest due time stands). :class:`SupersedeWorker`, a supervised
thread, revokes what is due: one ``superseded`` feed event per device (the broker then drops
only sessions presenting those serials), then the CRL is re-signed. Everything lives in the
database (migration 0006), so a restart neither loses nor repeats a revocation.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from fleetcore import renewal_wire as wire
from fleetcore.clock import utcnow
from fleetcore.renewal_wire import RefusalCode
from registry.crud import REVOCATION_SEQ, Actor, audit, bump_counter
from registry.db import begin_write
from registry.models import Certificate, Device, Revocation
from registry.renewal import RenewalRefused
from registry.supervise import SupervisedThread

__all__ = [
    "Confirmer",
    "SupersededRevocation",
    "SupersedeWorker",
    "confirm_certificate",
    "next_supersede_due",
    "parse_confirm",
    "revoke_due_superseded",
]

log = logging.getLogger(__name__)

#: Certificates revoked per transaction by the worker.
BATCH: Final = 500
SUPERSEDED: Final = "superseded"
#: Wait after a failed round (database down) before the next.
RETRY_AFTER_FAILURE_S: Final = 1.0


def parse_confirm(payload: bytes) -> str:
    """The serial of a confirm payload; RenewalRefused(``invalid_confirm``) otherwise."""
    try:
        return wire.parse_confirm(payload)
    except wire.ConfirmError as exc:
        raise RenewalRefused(RefusalCode.INVALID_CONFIRM, str(exc)) from None


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
    certificates for revocation at now + ``grace`` (one write transaction); RenewalRefused
    when the confirm is not valid."""
    now = now or utcnow()
    begin_write(session)
    try:
        result = _confirm(session, device_id, serial, grace, actor, now)
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return result


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
        raise RenewalRefused(RefusalCode.UNKNOWN_DEVICE, f"device {device_id} is not registered")
    if device.status != "active":
        raise RenewalRefused(
            RefusalCode.DEVICE_DECOMMISSIONED,
            f"device {device_id} is decommissioned; nothing to confirm",
        )
    certificates = list(
        session.exec(select(Certificate).where(Certificate.device_id == device_id)).all()
    )
    confirmed = next((c for c in certificates if c.serial == serial), None)
    if confirmed is None:
        raise RenewalRefused(
            RefusalCode.UNKNOWN_SERIAL,
            f"device {device_id} has no certificate with serial {serial}",
        )
    if confirmed.status != "live":
        raise RenewalRefused(RefusalCode.CERTIFICATE_REVOKED, f"certificate {serial} is revoked")
    newest = max(certificates, key=lambda c: (c.not_before, c.not_after, c.serial))
    if newest.serial != serial:
        raise RenewalRefused(
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
        audit(
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
    now = now or utcnow()
    begin_write(session)
    try:
        done = _revoke_due(session, actor, now, limit)
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return done


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
        seq = bump_counter(session, REVOCATION_SEQ)
        session.add(
            Revocation(
                seq=seq,
                device_id=device_id,
                serials=serials,
                reason=f"superseded by {','.join(by)}",
                reason_code=SUPERSEDED,
                revoked_at=now,
                operator=actor.who[:256],
                kind=SUPERSEDED,
            )
        )
        audit(session, actor, "supersede", device_id, {"serials": serials, "by": by, "seq": seq})
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


class Confirmer:
    """Answers confirm payloads (synchronous; the renewal worker thread calls it)."""

    def __init__(
        self,
        engine: Engine,
        actor: Actor,
        *,
        grace: dt.timedelta,
        on_scheduled: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.actor = actor
        self.grace = grace
        self._on_scheduled = on_scheduled

    def __call__(self, device_id: str, payload: bytes) -> bytes:
        """The answer to ``device_id``'s confirm ``payload``, or RenewalRefused."""
        serial = parse_confirm(payload)
        with Session(self.engine) as session:
            result = confirm_certificate(
                session, device_id, serial, grace=self.grace, actor=self.actor
            )
        if result.scheduled:
            log.info(
                "renewal confirmed device_id=%s serial=%s superseded=%s supersede_at=%s",
                device_id,
                serial,
                ",".join(result.scheduled),
                result.supersede_at.isoformat() if result.supersede_at else "-",
            )
            if self._on_scheduled is not None:
                self._on_scheduled()
        return wire.confirmed_payload(serial)


class SupersedeWorker:
    """The supervised thread that revokes superseded certificates when they fall due.

    It sleeps until the earliest due time in the database, at most ``check_s`` (confirms
    recorded by another registry process), and is woken by :meth:`wake` after a local
    confirm. ``on_revoked`` runs after each commit with the events appended (feed wake-up,
    CRL re-sign, metrics).
    """

    def __init__(
        self,
        engine: Engine,
        actor: Actor,
        *,
        on_revoked: Callable[[Sequence[SupersededRevocation]], None],
        check_s: float = 30.0,
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.actor = actor
        self.check_s = check_s
        self._on_revoked = on_revoked
        self._wake = threading.Event()
        self.thread = SupervisedThread("supersede", self._run, on_crash=on_crash)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self.thread.stop(0)
        self._wake.set()
        self.thread.stop()

    def run_once(self) -> list[SupersededRevocation]:
        """Revoke everything due now (in batches); returns the events appended."""
        appended: list[SupersededRevocation] = []
        while True:
            with Session(self.engine) as session:
                done = revoke_due_superseded(session, self.actor)
            if done:
                for event in done:
                    log.info(
                        "superseded certificates revoked device_id=%s serials=%s seq=%d",
                        event.device_id,
                        ",".join(event.serials),
                        event.seq,
                    )
                self._on_revoked(done)
                appended += done
            else:
                return appended

    def _sleep_s(self) -> float:
        with Session(self.engine) as session:
            due = next_supersede_due(session)
        if due is None:
            return self.check_s
        return max(0.0, min(self.check_s, (due - utcnow()).total_seconds()))

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self._wake.clear()
            try:
                self.run_once()
                sleep_s = self._sleep_s()
            except SQLAlchemyError as exc:  # the database is away: retry, not a crash
                log.error(
                    "superseded revocations failed error=%s retry_in=%.1fs",
                    type(exc).__name__,
                    RETRY_AFTER_FAILURE_S,
                )
                sleep_s = RETRY_AFTER_FAILURE_S
            self._wake.wait(sleep_s)
