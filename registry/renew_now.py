"""Renew now (issue 26): an operator asks a set of devices to renew at once, e.g. to move
them to a new issuing CA after ``certfleet ca rollover`` instead of at their due time.

The notice ``{"renew": "now"}`` (:func:`fleetcore.renewal_wire.renew_now_payload`) goes over
the existing renewal channel, the device's ``devices/<id>/cert/issued`` topic, which a device
that renews by itself listens to for the whole session (never retained: renewal topics never
are). A device that was offline, or missed it, gets it again with its next telemetry (at most
every ``resend_s``) until it sends a CSR. The pending set lives in this registry process
(a restart forgets it; ask again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from sqlmodel import Session

from fleetcore.clock import utcnow
from fleetcore.renewal_wire import renew_now_payload
from fleetcore.topics import issued_topic
from registry.db import write_transaction
from registry.errors import InvalidRequestError, UnavailableError
from registry.models import RenewNowRequest, RenewNowResult
from registry.state import RegistryState
from registry.store.audit import Actor, add_entry
from registry.store.devices import active_device_ids
from registry.store.issuers import issuer_use

__all__ = ["RenewNowNotices", "renew_now"]

log = logging.getLogger(__name__)

#: At most this many devices wait for their notice (older requests are dropped first).
MAX_PENDING = 1_000_000


class RenewNowNotices:
    """The devices asked to renew now that have not sent a CSR yet."""

    def __init__(self, publish: Callable[[str, bytes], None], *, resend_s: float = 10.0) -> None:
        self._publish = publish
        self._resend_s = resend_s
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # device id -> monotonic time of the last notice

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def request(self, device_ids: Iterable[str]) -> int:
        """Publish the notice to each device now; returns how many were asked."""
        count = 0
        for device_id in device_ids:
            self._send(device_id)
            count += 1
        log.info("renew now requested devices=%d", count)
        return count

    def seen(self, device_id: str) -> None:
        """The device is online (its telemetry came): resend a notice not yet acted on."""
        with self._lock:
            sent = self._pending.get(device_id)
        if sent is not None and time.monotonic() - sent >= self._resend_s:
            self._send(device_id)

    def renewing(self, device_id: str) -> None:
        """The device sent a CSR: its notice reached it."""
        with self._lock:
            self._pending.pop(device_id, None)

    def _send(self, device_id: str) -> None:
        with self._lock:
            self._pending.pop(device_id, None)
            while len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[device_id] = time.monotonic()
        self._publish(issued_topic(device_id), renew_now_payload())


def renew_now(
    state: RegistryState,
    notices: RenewNowNotices | None,
    request: RenewNowRequest,
    actor: Actor,
) -> RenewNowResult:
    """Ask the active devices of ``request`` (by id, or all on one issuing CA) to renew now;
    one audit entry. UnavailableError (503) without an MQTT link to the broker;
    InvalidRequestError (422) for neither or both of ids and issuer."""
    if notices is None:
        raise UnavailableError(
            "this registry has no MQTT connection to reach devices: set "
            "CERTFLEET_TELEMETRY_BROKER_ADDR (renewals go over MQTT)"
        )
    if bool(request.device_ids) == (request.issuer is not None):
        raise InvalidRequestError("give either device_ids or issuer (exactly one)")
    with Session(state.engine) as session:
        use = issuer_use(session, utcnow())
        if request.issuer is not None:
            chosen = use.devices_on(request.issuer)
            not_active: list[str] = []
        else:
            active = active_device_ids(session, request.device_ids)
            chosen = sorted(active)
            not_active = sorted(set(request.device_ids) - active)
        notices.request(chosen)
        with write_transaction(session):
            add_entry(
                session,
                actor,
                "renew_now",
                request.issuer or (chosen[0] if len(chosen) == 1 else f"{len(chosen)} devices"),
                {"devices": len(chosen), "issuer": request.issuer},
            )
    log.info("renew now devices=%d issuer=%s by=%s", len(chosen), request.issuer or "-", actor.who)
    return RenewNowResult(
        requested=len(chosen), device_ids=chosen[:1000], not_active=not_active[:1000]
    )
