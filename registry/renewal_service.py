"""The renewal worker: takes CSRs (and confirms) from the MQTT receive path, runs them through
the signing policy of :class:`registry.renewal.CertificateRenewer` on one worker thread, and
publishes each answer on ``devices/<id>/cert/issued`` (QoS 1).

Requests wait in one queue per device, served round-robin by the worker, at most
``PER_DEVICE_PENDING`` per device (a flood beyond that is dropped and counted as
``flooded``): one device's flood cannot starve the others. Beyond ``MAX_PENDING`` waiting
requests a CSR is refused with ``busy``. The worker is supervised: a crash is logged,
counted and the worker restarted. :func:`build_renewal_service` makes the renewer and the
service from the registry's settings (the MQTT client, :mod:`registry.telemetry`, calls it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from factory.ca import CertificateAuthority
from fleetcore.renewal_wire import RefusalCode, is_confirm, refusal_payload
from fleetcore.topics import issued_topic
from registry.errors import RenewalRefused
from registry.renewal import CertificateRenewer, answer_pem, device_of_renew_topic
from registry.settings import RegistrySettings
from registry.supervise import SupervisedThread

__all__ = ["MAX_PENDING", "PER_DEVICE_PENDING", "RenewalService", "build_renewal_service"]

log = logging.getLogger(__name__)

#: CSRs waiting for the worker beyond this are refused with ``busy``.
MAX_PENDING = 1000
#: CSRs of one device waiting at once; more are dropped (``flooded``), not answered.
PER_DEVICE_PENDING = 2


class RenewalService:
    """Takes CSRs from the MQTT receive path, renews them on one worker thread, and
    publishes each answer on ``devices/<id>/cert/issued``.

    ``publish(topic, payload)`` must be thread-safe (paho's ``Client.publish`` is).
    ``counters`` counts outcomes: ``issued``, ``repeated`` and each refusal code (and
    ``on_outcome``, when given, is called with each: the app feeds its Prometheus counter).
    """

    def __init__(
        self,
        renewer: CertificateRenewer,
        publish: Callable[[str, bytes], None],
        *,
        max_pending: int = MAX_PENDING,
        per_device_pending: int = PER_DEVICE_PENDING,
        on_outcome: Callable[[str], None] | None = None,
        on_crash: Callable[[str], None] | None = None,
        confirm: Callable[[str, bytes], bytes] | None = None,
        on_confirm_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.renewer = renewer
        self.counters: Counter[str] = Counter()
        #: outcomes of confirms (``confirmed`` or the refusal code)
        self.confirm_counters: Counter[str] = Counter()
        self._confirm = confirm
        self._on_confirm_outcome = on_confirm_outcome
        self._publish = publish
        self._on_outcome = on_outcome
        self._max_pending = max_pending
        self._per_device = per_device_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        #: device id -> its waiting CSRs; the first key is served next (round-robin).
        self._queues: OrderedDict[str, deque[bytes]] = OrderedDict()
        self._closing = False
        self._worker = SupervisedThread("renewal-worker", self._work, on_crash=on_crash)
        self._worker.start()

    @property
    def worker(self) -> SupervisedThread:
        return self._worker

    def submit(self, topic: str, payload: bytes | bytearray) -> None:
        """Queue one CSR (called on paho's network thread: never blocks on crypto or DB)."""
        try:
            device_id = device_of_renew_topic(topic)
        except RenewalRefused as exc:
            self._count(exc.error)
            log.warning("renewal refused topic=%r error=%s", topic[:200], exc.error)
            return  # no device to answer
        with self._lock:
            queue = self._queues.get(device_id)
            flooded = queue is not None and len(queue) >= self._per_device
            busy = not flooded and self._pending >= self._max_pending
            if not flooded and not busy:
                self._pending += 1
                self._queues.setdefault(device_id, deque()).append(bytes(payload))
                self._ready.notify()
        if flooded:
            # Not answered: the device's waiting requests will be. Logged at debug only, so a
            # flood does not become a flood of log lines; the counter shows it.
            self._count("flooded")
            log.debug("renewal dropped device_id=%s reason=flooded", device_id)
        elif busy:
            self._refuse(
                device_id,
                RenewalRefused(
                    RefusalCode.BUSY, f"{self._max_pending} renewals are waiting; retry in a minute"
                ),
            )

    def _next(self, stopping: threading.Event) -> tuple[str, bytes] | None:
        with self._lock:
            while not self._queues and not stopping.is_set() and not self._closing:
                self._ready.wait(1.0)
            if stopping.is_set() or not self._queues:
                return None
            device_id, queue = next(iter(self._queues.items()))
            payload = queue.popleft()
            if queue:
                self._queues.move_to_end(device_id)  # the others go first
            else:
                del self._queues[device_id]
            return device_id, payload

    def _work(self, stopping: threading.Event) -> None:
        while (item := self._next(stopping)) is not None:
            self._handle(*item)
        if not stopping.is_set():  # closing and drained: done, not a crash
            stopping.wait()

    def _handle(self, device_id: str, payload: bytes) -> None:
        if self._confirm is not None and is_confirm(payload):
            self._handle_confirm(self._confirm, device_id, payload)
            return
        try:
            if not self.renewer.claim(device_id, payload):
                # Another replica claimed this request first (both received it): it answers.
                self._count("claimed_elsewhere")
                log.debug("renewal left to another replica device_id=%s", device_id)
                return
            renewed = self.renewer.renew(device_id, payload)
        except RenewalRefused as exc:
            self._refuse(device_id, exc)
            return
        except SQLAlchemyError as exc:
            log.error("renewal failed device_id=%s error=%s", device_id, type(exc).__name__)
            self._refuse(
                device_id,
                RenewalRefused(
                    RefusalCode.REGISTRY_UNAVAILABLE,
                    "the registry could not record the certificate; retry later",
                ),
            )
            return
        except Exception:  # a bug must not kill the worker silently; the device is told
            log.exception("renewal crashed device_id=%s", device_id)
            self._refuse(
                device_id,
                RenewalRefused(RefusalCode.INTERNAL_ERROR, "the registry failed; retry later"),
            )
            return
        finally:
            with self._lock:
                self._pending = max(0, self._pending - 1)
        self._count("repeated" if renewed.repeated else "issued")
        if not renewed.repeated:
            log.info(
                "certificate renewed device_id=%s serial=%s not_after=%s",
                device_id,
                renewed.serial,
                renewed.not_after.isoformat(),
            )
        self._publish(issued_topic(device_id), answer_pem(self.renewer.ca, renewed.certificate_pem))

    def _handle_confirm(
        self, confirm: Callable[[str, bytes], bytes], device_id: str, payload: bytes
    ) -> None:
        """A JSON payload on cert/renew: the device confirms its new certificate."""
        try:
            answer = confirm(device_id, payload)
            outcome = "confirmed"
        except RenewalRefused as exc:
            outcome, answer = exc.error, exc.payload()
            log.warning(
                "confirm refused device_id=%s error=%s message=%s", device_id, exc.error, exc
            )
        except SQLAlchemyError as exc:
            log.error("confirm failed device_id=%s error=%s", device_id, type(exc).__name__)
            outcome = RefusalCode.REGISTRY_UNAVAILABLE
            answer = refusal_payload(outcome, "the registry could not record it; retry")
        except Exception:  # a bug must not kill the worker silently; the device is told
            log.exception("confirm crashed device_id=%s", device_id)
            outcome = RefusalCode.INTERNAL_ERROR
            answer = refusal_payload(outcome, "the registry failed; retry later")
        finally:
            with self._lock:
                self._pending = max(0, self._pending - 1)
        with self._lock:
            self.confirm_counters[outcome] += 1
        if self._on_confirm_outcome is not None:
            self._on_confirm_outcome(outcome)
        self._publish(issued_topic(device_id), answer)

    def _refuse(self, device_id: str, refusal: RenewalRefused) -> None:
        self._count(refusal.error)
        log.warning(
            "renewal refused device_id=%s error=%s message=%s", device_id, refusal.error, refusal
        )
        self._publish(issued_topic(device_id), refusal.payload())

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counters[outcome] += 1
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def close(self, timeout: float = 5.0) -> None:
        """Answer what is queued (for up to ``timeout`` seconds), then drop the rest."""
        with self._lock:
            self._closing = True
            self._ready.notify_all()
        end = time.monotonic() + timeout
        while self._pending and time.monotonic() < end:
            time.sleep(0.01)
        with self._lock:
            dropped = self._pending
            self._queues.clear()
            self._pending = 0
        self._worker.stop(0)
        with self._lock:
            self._ready.notify_all()
        self._worker.stop()
        if dropped:
            log.warning("renewal requests dropped at shutdown count=%d", dropped)
        log.info("renewal service stopped outcomes=%s", dict(self.counters))


def build_renewal_service(
    settings: RegistrySettings,
    engine: Engine,
    ca: CertificateAuthority,
    publish: Callable[[str, bytes], None],
    *,
    on_outcome: Callable[[str], None] | None = None,
    on_crash: Callable[[str], None] | None = None,
    confirm: Callable[[str, bytes], bytes] | None = None,
    on_confirm_outcome: Callable[[str], None] | None = None,
) -> RenewalService:
    """The renewal service of a registry with these settings, answering through ``publish``
    (thread-safe); its worker runs from now on (``close()`` it)."""
    renewer = CertificateRenewer(
        ca,
        engine,
        min_interval_s=settings.registry_renewal_min_interval_s,
        max_attempts=settings.registry_renewal_max_attempts,
        lifetime=settings.renewal_lifetime,
        stagger=settings.renewal_stagger,
        instance=settings.instance_name,
        shared_group=settings.registry_mqtt_shared,
    )
    return RenewalService(
        renewer,
        publish,
        on_outcome=on_outcome,
        on_crash=on_crash,
        confirm=confirm,
        on_confirm_outcome=on_confirm_outcome,
    )
