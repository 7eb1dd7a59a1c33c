"""One simulated device: connect, publish, back off, give up.

A :class:`SimDevice` behaves like real firmware. It takes a telemetry reading every
``1/rate`` seconds from its first connection to the end of the run and keeps every reading
that the broker has not acknowledged yet (its *unacked window*) until a PUBACK arrives, across
reconnects: after a dropped connection, even when the broker has lost every session (a
restart), the device resends the window on its next connection, so no sequence number is lost
at QoS 1. A dropped connection is transient (exponential backoff with full jitter, then
reconnect); a refused identity (a TLS alert about its certificate, or CONNACK "not authorized"
/ "bad credentials") is permanent: the device stops and reports why.

Every connection gets a fresh paho client (MQTT 3.1.1, clean session, client id = device id)
whose socket is driven by the process's one asyncio loop (``add_reader``/``add_writer`` fed by
paho's socket callbacks, ``loop_read``/``loop_write``/``loop_misc``; the plumbing is
:mod:`device_sim.paho_loop`), never by paho threads.
The TLS handshake itself is stepped by the loop too (:func:`device_sim.transport.open_tls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from device_sim.autorenew import RenewalPolicy, Renewer
from device_sim.backoff import Backoff
from device_sim.bundle import DeviceBundle, tls_context
from device_sim.credentials import Credentials
from device_sim.errors import BundleError, Failure, classify_connack, classify_os_error
from device_sim.paho_adapter import DeviceSocket, PreparedSocketClient
from device_sim.paho_loop import PahoOnLoop
from device_sim.renewal_events import RenewalEvent
from device_sim.stats import WorkerStats
from device_sim.telemetry import SensorModel
from device_sim.transport import open_tls
from device_sim.waits import completes_within, set_within
from fleetcore.address import Address
from fleetcore.renewal_wire import is_renew_now
from fleetcore.topics import issued_topic, renew_topic, telemetry_topic

__all__ = ["DeviceConfig", "DeviceEvent", "DeviceState", "SimDevice"]

log = logging.getLogger(__name__)


class DeviceState(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    STOPPED = "stopped"  # gave up for good (permanent failure)
    FINISHED = "finished"  # the run ended


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """How every device of a run behaves."""

    host: str
    port: int
    rate: float = 1.0  # readings per second
    qos: int = 1
    keepalive: int = 60
    connect_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    window: int = 1000  # unacked readings kept for resend; the oldest are dropped beyond it
    drain_timeout: float = 5.0  # at the end, how long to wait for outstanding PUBACKs
    server_hostname: str | None = None
    #: Brokers to fail over to after ``host:port``: a device moves to the next one of
    #: (host:port, *failover) after every drop or failed attempt, starting at its own index.
    failover: tuple[Address, ...] = ()
    #: Automatic renewal (device_sim.autorenew); None: the device never renews.
    renewal: RenewalPolicy | None = RenewalPolicy()

    @property
    def brokers(self) -> tuple[Address, ...]:
        """Every broker a device may use, in failover order."""
        return (Address(self.host, self.port), *self.failover)

    def __post_init__(self) -> None:
        if self.qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {self.qos}")
        if self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A lifecycle change worth reporting to whoever watches the run (the demo does)."""

    device_id: str
    kind: str  # connected | disconnected | connect_failed | stopped
    wall_time: float
    reason: str = ""


EventSink = Callable[[DeviceEvent], None]


@dataclass(slots=True)
class _Pending:
    payload: bytes
    sends: int = 0


class SimDevice:
    """One device's lifecycle; :meth:`run` until the deadline or a permanent failure."""

    def __init__(
        self,
        bundle: DeviceBundle,
        config: DeviceConfig,
        stats: WorkerStats,
        *,
        connect_slots: asyncio.Semaphore,
        events: EventSink | None = None,
        renewals: Callable[[RenewalEvent], None] | None = None,
        broker_index: int = 0,
        rng: random.Random | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.bundle = bundle
        self.device_id = bundle.device_id
        self.config = config
        self.stats = stats
        self.state = DeviceState.IDLE
        self.stop_reason: str | None = None
        self.topic = telemetry_topic(self.device_id)
        self._slots = connect_slots
        self._events = events
        self._renewals = renewals
        self._brokers = config.brokers
        self._broker_index = broker_index % len(self._brokers)
        self._last_broker: Address | None = None  # of the last successful connect
        self._rng = rng or random.Random()
        self._context = context
        self._backoff = Backoff(config.backoff_base, config.backoff_cap, self._rng)
        self._sensors = SensorModel(self.device_id, self._rng)
        self._seq = 0
        self._pending: OrderedDict[int, _Pending] = OrderedDict()  # seq -> unacked reading
        self._inflight: dict[int, tuple[int, float]] = {}  # mid -> (seq, sent monotonic)
        #: the current paho client and its socket, driven by the loop (device_sim.paho_loop).
        self._wire = PahoOnLoop(self.device_id)
        self._connack: asyncio.Future[Failure | None] | None = None
        self._session_end: asyncio.Future[Failure] | None = None
        self._closing = False
        self._producing = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ever_connected = False
        self._stop_at = 0.0
        self._window_empty: asyncio.Event | None = None
        self._next_due = 0.0
        # Renewal over the live connection (device_sim.autorenew.RenewalLink).
        self._up = asyncio.Event()
        self._finished = False
        self._answer: asyncio.Future[bytes] | None = None
        self._suback: dict[int, asyncio.Future[bool]] = {}
        #: the client subscribed to our issued topic, and its SUBACK (True: granted).
        self._issued_sub: tuple[PreparedSocketClient, asyncio.Future[bool]] | None = None
        #: set by a renew-now notice of an operator (fleetcore.renewal_wire.RenewNow).
        self._renew_requested = asyncio.Event()
        self._switch_to: Credentials | None = None
        self._switch_requested = asyncio.Event()
        self._switched: asyncio.Future[bool] | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is DeviceState.CONNECTED

    @property
    def broker(self) -> Address:
        """The broker this device is connected to, or will try next."""
        return self._brokers[self._broker_index]

    @property
    def unacked(self) -> int:
        return len(self._pending)

    @property
    def last_seq(self) -> int:
        return self._seq

    async def run(self, *, stop_at: float, stop: asyncio.Event | None = None) -> None:
        """Connect, publish and reconnect until loop time ``stop_at``, ``stop`` or a permanent
        failure; then drain outstanding acknowledgements and disconnect."""
        self._loop = asyncio.get_running_loop()
        self._stop_at = stop_at
        stop = stop or asyncio.Event()
        stopper = asyncio.ensure_future(stop.wait())
        renewing = self._start_renewer()
        try:
            await self._lifecycle(stopper)
        finally:
            self._finished = True
            stopper.cancel()
            if renewing is not None:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
            self._producing = False
            if self._tick_handle is not None:
                self._tick_handle.cancel()
            self._close_client()
            if self.state is not DeviceState.STOPPED:
                self.state = DeviceState.FINISHED

    def misc(self) -> None:
        """Keepalive bookkeeping; the worker calls it about once a second."""
        client = self._wire.client
        if client is not None and self.state is DeviceState.CONNECTED:
            client.loop_misc()

    # -- renewal link (device_sim.autorenew.RenewalLink) ----------------------------------

    def _start_renewer(self) -> asyncio.Task[None] | None:
        policy = self.config.renewal
        directory = self.bundle.cert.parent
        if policy is None or not (directory / "chain.pem").is_file():
            return None
        renewer = Renewer(
            directory, self.device_id, policy, self, self.stats, self._rng, self._renewals
        )
        return asyncio.ensure_future(renewer.run())

    @property
    def running(self) -> bool:
        """False once the device's run has ended (its renewer stops)."""
        return not self._finished

    async def wait_connected(self, within: float) -> bool:
        """True once connected (at once when connected), False after ``within`` seconds
        or at once when the run has ended."""
        if self._finished:
            return False
        return await set_within(self._up, within)

    async def exchange(self, payload: bytes, within: float) -> bytes | None:
        """Publish on our renew topic; the next message on our issued topic, or None."""
        assert self._loop is not None
        client = self._wire.client
        if client is None or not self._up.is_set():
            return None
        try:
            async with asyncio.timeout(within):
                suback = self._subscribe_issued(client)
                if suback is None or not await suback:
                    return None
                self._answer = self._loop.create_future()
                info = client.publish(renew_topic(self.device_id), payload, qos=1)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return None
                return await self._answer
        except TimeoutError:
            return None
        finally:
            self._answer = None

    def _subscribe_issued(self, client: PreparedSocketClient) -> asyncio.Future[bool] | None:
        """Subscribe ``client`` to our issued topic once per connection (renewal answers and
        renew-now notices); the SUBACK's future, None when the subscribe failed."""
        assert self._loop is not None
        if self._issued_sub is not None and self._issued_sub[0] is client:
            return self._issued_sub[1]
        result, mid = client.subscribe(issued_topic(self.device_id), qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        suback = self._suback[mid] = self._loop.create_future()
        self._issued_sub = (client, suback)
        return suback

    async def wait_renew_request(self, within: float) -> bool:
        """True when an operator asked this device to renew now (a notice on its issued
        topic, :func:`fleetcore.renewal_wire.renew_now_payload`) within ``within`` s."""
        requested = await set_within(self._renew_requested, within)
        self._renew_requested.clear()
        return requested

    async def switch(self, credentials: Credentials) -> bool:
        """End the session and reconnect with ``credentials``; True once connected."""
        assert self._loop is not None
        self._switch_to = credentials
        switched: asyncio.Future[bool] = self._loop.create_future()
        self._switched = switched
        self._switch_requested.set()
        return await switched

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any
    ) -> None:
        suback = self._suback.pop(mid, None)
        if suback is not None and not suback.done():
            suback.set_result(not any(getattr(code, "is_failure", False) for code in codes))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if is_renew_now(bytes(message.payload)):
            self._renew_requested.set()
            return
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(bytes(message.payload))

    # -- lifecycle ------------------------------------------------------------------------

    def _time_left(self) -> float:
        assert self._loop is not None
        return self._stop_at - self._loop.time()

    async def _lifecycle(self, stopper: asyncio.Future[Any]) -> None:
        assert self._loop is not None
        while self._time_left() > 0 and not stopper.done():
            self.state = DeviceState.CONNECTING
            candidate, self._switch_to = self._switch_to, None
            connect = asyncio.ensure_future(self._connect(candidate))
            await asyncio.wait(
                [connect, stopper],
                timeout=max(self._time_left(), 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not connect.done():
                connect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connect
                return
            failure = connect.result()
            if candidate is not None:
                self._resolve_switch(failure is None)
                if failure is not None:
                    # The renewed certificate did not connect: at once back to the old one.
                    log.warning(
                        "renewed certificate refused device_id=%s reason=%s",
                        self.device_id,
                        failure.reason,
                    )
                    continue
            if failure is None:
                failure = await self._session(stopper)
                if failure is None:  # the run ended while connected
                    return
                self._close_client()
                if failure.reason == "renewal_switch":
                    continue  # reconnect now, with the renewed certificate
                self.stats.disconnects[failure.reason] += 1
                self._emit("disconnected", failure.reason)
                log.info(
                    "device disconnected device_id=%s reason=%s", self.device_id, failure.reason
                )
                if failure.permanent:
                    self._give_up(failure)
                    return
                # A dropped session is followed by an immediate first retry (jittered).
            else:
                self.stats.failures[failure.reason] += 1
                self._emit("connect_failed", failure.reason)
                if failure.permanent:
                    self._give_up(failure)
                    return
            self.state = DeviceState.BACKOFF
            self._broker_index = (self._broker_index + 1) % len(self._brokers)
            delay = min(self._backoff.next_delay(), max(self._time_left(), 0.0))
            await completes_within(asyncio.shield(stopper), delay)

    def _give_up(self, failure: Failure) -> None:
        self.state = DeviceState.STOPPED
        self.stop_reason = failure.reason
        self.stats.stopped += 1
        self.stats.permanent[failure.reason] += 1
        self._producing = False
        self._emit("stopped", failure.reason)
        log.warning(
            "device stopped device_id=%s reason=%s detail=%s",
            self.device_id,
            failure.reason,
            failure.detail or "-",
        )

    def _resolve_switch(self, connected: bool) -> None:
        switched, self._switched = self._switched, None
        if switched is not None and not switched.done():
            switched.set_result(connected)

    async def _connect(self, candidate: Credentials | None = None) -> Failure | None:
        """One connection attempt: TCP + TLS + CONNECT/CONNACK, bounded by connect_timeout and
        by the worker's concurrent-connect slots; with ``candidate``, with those credentials
        (a renewal being proven), which become the device's on success. None on success."""
        assert self._loop is not None
        loop = self._loop
        async with self._slots:
            started = loop.time()
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    if candidate is not None:
                        context = tls_context(self.bundle, candidate.cert, candidate.key)
                    else:
                        context = self._context or tls_context(self.bundle)
                    self._context = context
                    tls_socket = await open_tls(
                        self.broker.host,
                        self.broker.port,
                        context,
                        server_hostname=self.config.server_hostname,
                    )
                    self._connack = loop.create_future()
                    self._start_client(tls_socket)
                    failure = await self._connack
            except TimeoutError:
                self._close_client()
                self._context = None if candidate is not None else self._context
                return Failure("connect_timeout", permanent=False)
            except OSError as exc:
                self._close_client()
                self._context = None if candidate is not None else self._context
                return classify_os_error(exc)
            except BundleError as exc:
                return Failure("bundle_unreadable", permanent=True, detail=str(exc))
        if failure is not None:
            self._close_client()
            if candidate is not None:
                self._context = None  # back to the bundle's current pair
            return failure
        self.stats.connect_latency.record(loop.time() - started)
        return None

    def _start_client(self, tls_socket: ssl.SSLSocket) -> None:
        sock = DeviceSocket(tls_socket)
        client = PreparedSocketClient(self.device_id, sock)
        client.max_inflight_messages_set(0)  # the device's own window bounds what is unacked
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._wire.attach(client, sock)
        self._closing = False
        self._session_end = None
        client.connect_async(self.broker.host, self.broker.port, self.config.keepalive)
        rc = client.reconnect()  # sends CONNECT on the prepared socket; does not block
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"sending CONNECT failed: {mqtt.error_string(rc)}")

    async def _session(self, stopper: asyncio.Future[Any]) -> Failure | None:
        """Connected: resend the unacked window, publish until the deadline or a drop."""
        assert self._loop is not None
        self.state = DeviceState.CONNECTED
        self._backoff.reset()
        self.stats.connects += 1
        self.stats.connected += 1
        if not self._ever_connected:
            self._ever_connected = True
            self.stats.ever_connected += 1
        else:
            self.stats.reconnects += 1
            if self._last_broker != self.broker:
                self.stats.failovers += 1
        self._last_broker = self.broker
        self._emit("connected")
        session_end = self._session_end
        assert session_end is not None
        self._up.set()
        self._switch_requested.clear()
        if self.config.renewal is not None and self._wire.client is not None:
            # Listen for renew-now notices from the first moment of the session.
            self._subscribe_issued(self._wire.client)
        switch = asyncio.ensure_future(self._switch_requested.wait())
        try:
            self._resend_window()
            if not self._producing:
                self._producing = True
                # A random phase, so a fleet started together does not publish in lockstep.
                first = self._rng.uniform(0.0, 1.0 / self.config.rate)
                self._next_due = self._loop.time() + first
                self._tick_handle = self._loop.call_at(self._next_due, self._tick)
            await asyncio.wait(
                [session_end, stopper, switch],
                timeout=max(self._time_left(), 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if session_end.done():
                return session_end.result()
            if switch.done() and not stopper.done() and self._time_left() > 0:
                await self._disconnect(session_end)
                return Failure("renewal_switch", permanent=False)
            self._producing = False
            await self._drain(session_end)
            return None
        finally:
            switch.cancel()
            self._up.clear()
            self.stats.connected -= 1

    async def _drain(self, session_end: asyncio.Future[Failure]) -> None:
        """The run is over: wait (bounded) for outstanding PUBACKs, then disconnect cleanly."""
        assert self._loop is not None
        if self._pending:
            self._window_empty = asyncio.Event()
            emptied: asyncio.Future[Any] = asyncio.ensure_future(self._window_empty.wait())
            await asyncio.wait(
                [emptied, session_end],
                timeout=self.config.drain_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            emptied.cancel()
            self._window_empty = None
        await self._disconnect(session_end)

    async def _disconnect(self, session_end: asyncio.Future[Failure]) -> None:
        """A clean DISCONNECT, waiting (bounded) for the broker to close."""
        client = self._wire.client
        if client is not None and not session_end.done():
            self._closing = True
            client.disconnect()
            await completes_within(asyncio.shield(session_end), 1.0)

    # -- publishing -----------------------------------------------------------------------

    def _tick(self) -> None:
        """Take one reading; queue it; send it when connected; schedule the next one."""
        assert self._loop is not None
        if not self._producing or self._time_left() <= 0:
            self._producing = False
            return
        # A fixed schedule (not "period after this tick"), so a late tick does not lower the
        # rate; after a stall of more than a second it catches up one second's worth at most.
        now = self._loop.time()
        self._next_due = max(self._next_due + 1.0 / self.config.rate, now - 1.0)
        self._tick_handle = self._loop.call_at(max(self._next_due, now), self._tick)
        self._seq += 1
        self.stats.produced += 1
        payload = self._sensors.reading(self._seq)
        if len(self._pending) >= self.config.window:
            self._pending.popitem(last=False)
            self.stats.dropped_overflow += 1
        entry = _Pending(payload)
        self._pending[self._seq] = entry
        if self.state is DeviceState.CONNECTED:
            self._send(self._seq, entry)

    def _send(self, seq: int, entry: _Pending) -> None:
        client = self._wire.client
        if client is None:
            return
        sent_at = time.monotonic()
        info = client.publish(self.topic, entry.payload, qos=self.config.qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return  # the connection is going down; the reading stays in the window
        if entry.sends:
            self.stats.retransmitted += 1
        entry.sends += 1
        self.stats.sent += 1
        if self.config.qos == 0 and info.is_published():
            # QoS 0 completes when written, which paho may do inside publish() itself.
            self._complete(seq, sent_at)
        else:
            self._inflight[info.mid] = (seq, sent_at)

    def _resend_window(self) -> None:
        for seq, entry in list(self._pending.items()):
            if self.state is not DeviceState.CONNECTED:
                return
            self._send(seq, entry)

    # -- paho callbacks -------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        failure = None if not reason.is_failure else classify_connack(int(reason.value))
        if failure is None:
            assert self._loop is not None
            self._session_end = self._loop.create_future()
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(failure)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if client is not self._wire.client:
            return
        socket_error = self._wire.socket.error if self._wire.socket is not None else None
        if socket_error is not None:
            failure = classify_os_error(socket_error)
        elif self._closing:
            failure = Failure("closed_by_device", permanent=False)
        elif self._connack is not None and not self._connack.done():
            failure = Failure("closed_before_connack", permanent=False)
        else:
            failure = Failure("connection_lost", permanent=False)
        self._inflight.clear()  # readings stay in the window and are resent next time
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(failure)
        if self._session_end is not None and not self._session_end.done():
            self._session_end.set_result(failure)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        sent = self._inflight.pop(mid, None)
        if sent is None:
            return
        self._complete(*sent)

    def _complete(self, seq: int, sent_at: float) -> None:
        if self._pending.pop(seq, None) is not None:
            self.stats.acked += 1
            self.stats.publish_latency.record(time.monotonic() - sent_at)
            if not self._pending and self._window_empty is not None:
                self._window_empty.set()

    # -- helpers --------------------------------------------------------------------------

    def _close_client(self) -> None:
        """Drop the connection at once (no DISCONNECT): the socket is ours, we close it."""
        self._inflight.clear()
        if self._wire.close():
            self._closing = True

    def _emit(self, kind: str, reason: str = "") -> None:
        if self._events is not None:
            self._events(DeviceEvent(self.device_id, kind, time.time(), reason))
