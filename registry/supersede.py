"""Superseded certificates: a renewed device confirms its new certificate, the older ones are
revoked (reason ``superseded``) after a grace.

The device publishes ``{"confirm": "<serial of the new certificate, lower-case hex>"}`` on
``devices/<id>/cert/renew`` once it has connected with that certificate; the registry's
renewal worker (:class:`registry.renewal_service.RenewalService`) hands JSON payloads there to
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
database (migration 0006), so a restart neither loses nor repeats a revocation; the data
layer is :mod:`registry.store.supersede`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Final

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from fleetcore import renewal_wire as wire
from fleetcore.clock import utcnow
from fleetcore.renewal_wire import RefusalCode
from registry.errors import ConfirmRefusedError, DecommissionedDeviceError, NotFoundError
from registry.renewal import RenewalRefused
from registry.store.audit import Actor
from registry.store.supersede import (
    SupersededRevocation,
    confirm_certificate,
    next_supersede_due,
    revoke_due_superseded,
)
from registry.supervise import SupervisedThread

__all__ = ["Confirmer", "SupersedeWorker", "parse_confirm"]

log = logging.getLogger(__name__)

#: Wait after a failed round (database down) before the next.
RETRY_AFTER_FAILURE_S: Final = 1.0


def parse_confirm(payload: bytes) -> str:
    """The serial of a confirm payload; RenewalRefused(``invalid_confirm``) otherwise."""
    try:
        return wire.parse_confirm(payload)
    except wire.ConfirmError as exc:
        raise RenewalRefused(RefusalCode.INVALID_CONFIRM, str(exc)) from None


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
        try:
            with Session(self.engine) as session:
                result = confirm_certificate(
                    session, device_id, serial, grace=self.grace, actor=self.actor
                )
        except NotFoundError as exc:
            raise RenewalRefused(RefusalCode.UNKNOWN_DEVICE, str(exc)) from None
        except DecommissionedDeviceError as exc:
            raise RenewalRefused(RefusalCode.DEVICE_DECOMMISSIONED, str(exc)) from None
        except ConfirmRefusedError as exc:
            raise RenewalRefused(RefusalCode(exc.refusal), str(exc)) from None
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
