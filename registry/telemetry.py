"""Telemetry ingest: the registry's MQTT subscriber that keeps each device's last seen time
and latest telemetry.

The registry connects to the broker as ``spiffe://<td>/service/registry`` (certificate
``clients/registry.crt|.key``, trusting ``ca/root.crt``; client id: the certificate's service
name, or ``CERTFLEET_REGISTRY_MQTT_CLIENT_ID``), subscribes to ``devices/+/telemetry`` at
QoS 1 and keeps, per device, only the newest reading in memory.

Replicas share the work: the filters are subscribed through the broker's shared
subscriptions, one group each (:data:`TELEMETRY_GROUP`, :data:`RENEWAL_GROUP`;
``CERTFLEET_REGISTRY_MQTT_SHARED=false`` subscribes plainly), so the broker gives each
reading, and each renewal request, to one replica (docs/broker.md, "Shared subscriptions").
The database's renewal claim stays the safety net for a request delivered twice (a
replica that left before acknowledging it).

The subscriptions are checked: every SUBACK must grant every filter, on each (re)connect and
from a watchdog that re-subscribes every ``registry_mqtt_watchdog_s`` (SUBSCRIBE is
idempotent, and a broker that silently dropped the session's subscriptions gives no other
sign). A refused or missing SUBACK is logged, counted (``subscribe_failures``) and retried;
three in a row force a reconnect. Retained messages (replayed at every subscription) are
never acted on: a retained CSR is not a request, a retained reading is not "seen now".
A separate flusher thread writes the buffer through :func:`registry.telemetry.record_telemetry` in
one batched UPDATE every ``flush_interval`` seconds (sooner when ``flush_batch`` devices are
waiting), so the broker's message rate is never bounded by the database: receiving a message
costs a JSON parse and a dict store, nothing more.

A message is dropped and counted when its payload is not a JSON object, is larger than
``MAX_PAYLOAD_BYTES``, or names a different device than its topic (``devices/<id>/...``).
Telemetry of unknown devices is ignored by the UPDATE.

The counters (``IngestCounters``) are plain attributes; ``registry.metrics.TelemetryCollector``
exports them on the registry's ``/api/v1/metrics`` when it is scraped.

Given the CA (``start_ingest(settings, engine, ca)``, as the app does) and with
``registry_renewal_enabled``, the same connection also subscribes to ``devices/+/cert/renew``
(QoS 1) and hands each CSR to :class:`registry.renewal_service.RenewalService` (built by
:func:`registry.renewal_service.build_renewal_service`), which signs on its own worker thread
and answers on ``devices/<id>/cert/issued``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from factory.ca import CertificateAuthority
from fleetcore.clock import utcnow
from fleetcore.errors import ConfigError, IdentityError
from fleetcore.profile import NAME_PATTERN, read_identity
from fleetcore.topics import RENEW, RENEW_FILTER, TELEMETRY, TELEMETRY_FILTER, device_of
from registry.errors import TelemetryRejected
from registry.renew_now import RenewNowNotices
from registry.renewal_service import RenewalService, build_renewal_service
from registry.settings import RegistrySettings, split_addr
from registry.store.telemetry import TelemetryUpdate, record_telemetry
from registry.supervise import SupervisedThread
from registry.tls import service_client_context_of

__all__ = ["MAX_PAYLOAD_BYTES", "TelemetryIngest", "parse_telemetry", "start_ingest"]

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 16 * 1024
CLIENT_NAME = "registry"
#: How long a SUBACK may take before the subscription counts as failed.
SUBACK_TIMEOUT_S = 10.0
#: Failed subscription checks in a row before the watchdog reconnects.
FAILURES_BEFORE_RECONNECT = 3


#: The shared-subscription groups of the registry's replicas.
TELEMETRY_GROUP = "registry-telemetry"
RENEWAL_GROUP = "registry-renewal"


def shared_filter(group: str, topic_filter: str) -> str:
    """``topic_filter`` as a member of the broker's shared group ``group``."""
    return f"$share/{group}/{topic_filter}"


def parse_telemetry(topic: str, payload: bytes | bytearray) -> tuple[str, dict[str, Any]]:
    """``(device_id, telemetry)`` of a message, or TelemetryRejected with the reason."""
    device_id = device_of(topic, TELEMETRY)
    if device_id is None:
        raise TelemetryRejected("bad_topic", f"topic {topic!r} is not devices/<id>/telemetry")
    if not NAME_PATTERN.fullmatch(device_id):
        raise TelemetryRejected("bad_topic", f"topic {topic!r} names no valid device id")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TelemetryRejected("too_large", f"payload of {len(payload)} bytes")
    try:
        telemetry = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise TelemetryRejected("malformed_json", "payload is not JSON") from None
    if not isinstance(telemetry, dict):
        raise TelemetryRejected("malformed_json", "payload is not a JSON object")
    if telemetry.get("device_id") != device_id:
        raise TelemetryRejected(
            "device_mismatch",
            f"payload device_id {telemetry.get('device_id')!r} differs from topic {device_id!r}",
        )
    return device_id, telemetry


@dataclass
class IngestCounters:
    received: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    flushes: int = 0
    rows_written: int = 0
    flush_errors: int = 0
    flush_seconds_total: float = 0.0
    flush_seconds_max: float = 0.0
    connects: int = 0
    subscribe_checks: int = 0
    subscribe_failures: int = 0
    callback_errors: int = 0


class TelemetryIngest:
    """The subscriber (paho's network thread) and the batch writer (a flusher thread)."""

    def __init__(
        self,
        settings: RegistrySettings,
        engine: Engine,
        *,
        flush_interval: float = 0.5,
        flush_batch: int = 1000,
        ca: CertificateAuthority | None = None,
        on_renewal_outcome: Callable[[str], None] | None = None,
        on_crash: Callable[[str], None] | None = None,
        confirm: Callable[[str, bytes], bytes] | None = None,
        on_confirm_outcome: Callable[[str], None] | None = None,
    ) -> None:
        if not settings.telemetry_broker_addr:
            raise ConfigError("telemetry ingest needs CERTFLEET_TELEMETRY_BROKER_ADDR (host:port)")
        self.host, self.port = split_addr(settings.telemetry_broker_addr)
        self.engine = engine
        self.flush_interval = flush_interval
        self.flush_batch = flush_batch
        self.counters = IngestCounters()
        self.connected = threading.Event()
        #: set once the broker acknowledged the subscriptions (telemetry and renewal)
        self.subscribed = threading.Event()
        self._layout = settings.layout
        self._client_id = settings.registry_mqtt_client_id
        self._instance = settings.instance_name
        self._on_crash = on_crash
        self._watchdog_s = settings.registry_mqtt_watchdog_s
        self._shared = settings.registry_mqtt_shared
        #: SUBSCRIBE message ids waiting for their SUBACK -> set when it came and granted all.
        self._suback_waits: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._sub_lock = threading.Lock()
        self._buffer: dict[str, TelemetryUpdate] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._client = self._build_client()
        self.renewal: RenewalService | None = None
        #: devices an operator asked to renew now (``POST /api/v1/devices/renew-now``).
        self.renew_now = RenewNowNotices(self._publish_qos1)
        if ca is not None and settings.registry_renewal_enabled:
            self.renewal = build_renewal_service(
                settings,
                engine,
                ca,
                self._publish_qos1,
                on_outcome=on_renewal_outcome,
                on_crash=on_crash,
                confirm=confirm,
                on_confirm_outcome=on_confirm_outcome,
            )
        self._flusher = SupervisedThread("telemetry-flush", self._flush_loop, on_crash=on_crash)
        self._watchdog = SupervisedThread("mqtt-watchdog", self._watch, on_crash=on_crash)

    def _build_client(self) -> mqtt.Client:
        context = service_client_context_of(self._layout, CLIENT_NAME, "telemetry ingest")
        cert = self._layout.client_cert(CLIENT_NAME)
        client_id = self._client_id or f"{_service_name(cert)}/{self._instance}"
        self.client_id = client_id
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.tls_set_context(context)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def filters(self) -> list[str]:
        """What the ingest subscribes to: telemetry, and renewal requests when it answers
        them; each through its shared group unless ``registry_mqtt_shared`` is off."""
        wanted = [(TELEMETRY_GROUP, TELEMETRY_FILTER)]
        if self.renewal is not None:
            wanted.append((RENEWAL_GROUP, RENEW_FILTER))
        if not self._shared:
            return [topic_filter for _group, topic_filter in wanted]
        return [shared_filter(group, topic_filter) for group, topic_filter in wanted]

    def start(self) -> TelemetryIngest:
        self._flusher.start()
        self._watchdog.start()
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()  # one network thread; retries until the broker is up
        log.info("telemetry ingest connecting broker=%s:%s", self.host, self.port)
        return self

    def stop_sync(self, timeout: float = 5.0) -> None:
        """Disconnect, flush what is buffered, stop both threads."""
        self._stopping.set()
        if self.renewal is not None:
            self.renewal.close()  # its last answer still goes out before the disconnect
        self._client.disconnect()
        self._client.loop_stop()
        self._wake.set()
        self._watchdog.stop(timeout)
        self._flusher.stop(timeout)
        self.flush()
        log.info(
            "telemetry ingest stopped received=%d accepted=%d rows_written=%d rejected=%s",
            self.counters.received,
            self.counters.accepted,
            self.counters.rows_written,
            dict(self.counters.rejected),
        )

    async def stop(self) -> None:
        import asyncio

        await asyncio.to_thread(self.stop_sync)

    # -- receiving (paho's thread) --------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("telemetry ingest refused by broker reason=%s", reason)
            return
        self.counters.connects += 1
        _no_delay(client)
        self.connected.set()
        self._subscribe()
        log.info(
            "telemetry ingest subscribing client_id=%s topics=%s",
            self.client_id,
            ",".join(self.filters),
        )

    def _subscribe(self) -> tuple[threading.Event, list[bool]] | None:
        """Send one SUBSCRIBE for every filter; the wait its SUBACK will settle."""
        waiter: tuple[threading.Event, list[bool]] = (threading.Event(), [])
        with self._sub_lock:  # held until the mid is recorded: the SUBACK waits for it
            rc, mid = self._client.subscribe([(f, 1) for f in self.filters])
            if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                return None
            self._suback_waits[mid] = waiter
        return waiter

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stopping.is_set():
            log.warning("telemetry ingest disconnected reason=%s; reconnecting", reason)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any
    ) -> None:
        with self._sub_lock:
            waiter = self._suback_waits.pop(mid, None)
        refused = [code for code in codes if getattr(code, "is_failure", False)]
        granted = not refused and len(codes) == len(self.filters)
        if waiter is not None:
            waiter[1].append(granted)
            waiter[0].set()
        if not granted:
            self.counters.subscribe_failures += 1
            self.subscribed.clear()
            log.error(
                "telemetry ingest subscription refused by broker codes=%s filters=%s",
                refused or codes,
                ",".join(self.filters),
            )
            return
        self.subscribed.set()

    # -- the subscription watchdog --------------------------------------------------------

    def _watch(self, stopping: threading.Event) -> None:
        failures = 0
        while not stopping.wait(self._watchdog_s):
            if not self.connected.is_set():
                continue
            waiter = self._subscribe()
            ok = waiter is not None and waiter[0].wait(SUBACK_TIMEOUT_S) and waiter[1] == [True]
            if ok:
                self.counters.subscribe_checks += 1
                if failures:
                    log.warning("telemetry ingest subscriptions restored after=%d", failures)
                failures = 0
                continue
            if waiter is not None and not waiter[0].is_set():
                self.counters.subscribe_failures += 1  # no SUBACK at all
            failures += 1
            log.error(
                "telemetry ingest subscription check failed client_id=%s failures=%d",
                self.client_id,
                failures,
            )
            if failures >= FAILURES_BEFORE_RECONNECT:
                failures = 0
                log.error("telemetry ingest reconnecting after failed subscription checks")
                with contextlib.suppress(Exception):
                    self._client.reconnect()

    def _publish_qos1(self, topic: str, payload: bytes) -> None:
        # Never retained: a stored answer would reach the device's next subscription.
        info = self._client.publish(topic, payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("publish failed topic=%s rc=%s", topic, info.rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # paho's network thread dies with an exception raised here: never let one out.
        try:
            self._receive(message)
        except Exception:
            self.counters.callback_errors += 1
            log.exception("telemetry ingest message handling failed topic=%s", message.topic)
            if self._on_crash is not None:
                self._on_crash("mqtt-receive")

    def _receive(self, message: mqtt.MQTTMessage) -> None:
        renewal = message.topic.endswith("/" + RENEW)
        if message.retain and not renewal:
            self.counters.received += 1
            self.counters.rejected["retained"] += 1
            return
        if self.renewal is not None and renewal:
            if message.retain:
                # A stored request replays on every (re)subscription: never act on one.
                self.counters.rejected["retained_renewal"] += 1
                log.warning("renewal request ignored topic=%s reason=retained", message.topic)
                return
            renewing = device_of(message.topic, RENEW)
            if renewing is not None:
                self.renew_now.renewing(renewing)
            self.renewal.submit(message.topic, message.payload)
            return
        self.counters.received += 1
        try:
            device_id, telemetry = parse_telemetry(message.topic, message.payload)
        except TelemetryRejected as exc:
            self.counters.rejected[exc.reason] += 1
            log.debug("telemetry dropped topic=%s reason=%s", message.topic, exc.reason)
            return
        self.counters.accepted += 1
        self.renew_now.seen(device_id)
        update = TelemetryUpdate(device_id, utcnow(), telemetry)
        with self._lock:
            self._buffer[device_id] = update
            full = len(self._buffer) >= self.flush_batch
        if full:
            self._wake.set()

    # -- writing (the flusher thread) -----------------------------------------------------

    def _flush_loop(self, stopping: threading.Event) -> None:
        while not stopping.is_set() and not self._stopping.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()
        stopping.wait()

    def flush(self) -> int:
        """Write the buffered updates in one batch; returns how many devices were updated."""
        with self._lock:
            batch, self._buffer = self._buffer, {}
        if not batch:
            return 0
        started = time.perf_counter()
        try:
            with Session(self.engine) as session:
                written = record_telemetry(session, list(batch.values()))
        except SQLAlchemyError as exc:
            self.counters.flush_errors += 1
            log.error("telemetry flush failed devices=%d error=%s", len(batch), type(exc).__name__)
            with self._lock:  # keep them for the next attempt unless newer ones arrived
                for device_id, update in batch.items():
                    self._buffer.setdefault(device_id, update)
            return 0
        elapsed = time.perf_counter() - started
        self.counters.flushes += 1
        self.counters.rows_written += written
        self.counters.flush_seconds_total += elapsed
        self.counters.flush_seconds_max = max(self.counters.flush_seconds_max, elapsed)
        return written


def _no_delay(client: mqtt.Client) -> None:
    """TCP_NODELAY: paho leaves Nagle on, which holds a renewal answer written right after a
    PUBACK until the broker's delayed ACK (about 40 ms per answer)."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket included
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _service_name(cert: Path) -> str:
    """The service name in the registry's certificate: its MQTT client id by default."""
    try:
        return read_identity(x509.load_pem_x509_certificate(cert.read_bytes())).name
    except (OSError, ValueError, IdentityError) as exc:
        raise ConfigError(f"telemetry ingest cannot read its certificate {cert}: {exc}") from None


def start_ingest(
    settings: RegistrySettings,
    engine: Engine,
    ca: CertificateAuthority | None = None,
    on_renewal_outcome: Callable[[str], None] | None = None,
    on_crash: Callable[[str], None] | None = None,
    confirm: Callable[[str, bytes], bytes] | None = None,
    on_confirm_outcome: Callable[[str], None] | None = None,
) -> TelemetryIngest:
    """Start ingesting telemetry from ``settings.telemetry_broker_addr`` (and answering
    renewals, and confirms through ``confirm``, when ``ca`` is given); ``await .stop()``."""
    return TelemetryIngest(
        settings,
        engine,
        ca=ca,
        on_renewal_outcome=on_renewal_outcome,
        on_crash=on_crash,
        confirm=confirm,
        on_confirm_outcome=on_confirm_outcome,
    ).start()
