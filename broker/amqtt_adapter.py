"""amqtt, adapted for a single node: the plugins and the broker's overrides (amqtt 0.12,
pinned ``amqtt<0.13``).

The adapter is this module, :mod:`broker.amqtt_cluster_routing` (a cluster node's broker,
items 10-15), :mod:`broker.amqtt_session` (session reads) and :mod:`broker.amqtt_state`
(persistent state: save and restore, items 7-8); they alone know amqtt's
insides (``tests/architecture/test_amqtt_boundary.py``). Everything else in :mod:`broker`
uses amqtt's public surface only (``Broker.start``, ``shutdown``, ``external_connected``,
plugins with a ``Config`` dataclass, the reader/writer adapters, ``ConnectPacket``,
``Action``) and the cluster the seam of :mod:`broker.broker_port`. What the adapter relies
on beyond that is listed here, and each item is pinned by
``tests/broker/test_amqtt_adapter_pins.py``, so that an amqtt upgrade that moves it fails
those tests loudly rather than the broker quietly:

1. ``Broker._topic_filtering(session, topic, action)`` — amqtt asks it for every PUBLISH,
   every SUBSCRIBE filter and every RECEIVE (each routed copy). Its own body asks topic
   plugins through ``PluginManager.map_plugin_topic``: a task per plugin and a gather,
   twice per routed message. Overridden to call :class:`~broker.acl.TopicAcl` directly.
   The ACL is *also* registered as an ordinary topic plugin (:class:`AclTopicPlugin`), so
   if the override stopped being called the ACL would still hold, only slower.
2. ``Broker._broadcast_loop()`` — amqtt's routing loop. It wraps *every* message in a new
   task and an ``asyncio.wait`` (to notice shutdown while blocked on the queue). Ours
   routes queued messages back to back while there is a backlog and takes amqtt's waiting
   path only when the queue is empty; a message whose routing raises is logged and counted
   and routing goes on (a dead loop would stop all routing, silently). It relies on
   ``_broadcast_queue`` (an ``asyncio.Queue`` of ``{"session", "topic", "data"[, "qos"]}``),
   ``_broadcast_shutdown_waiter`` (a future done at shutdown), ``_tasks_queue`` (a deque
   of delivery tasks) and ``_run_broadcast(running)`` (takes one item off the queue, routes
   it and appends its delivery tasks to ``running``).
3. ``Broker._publish_session_retained_messages(session)`` — called at CONNECT to forward
   what was queued for a persistent session while it was away (``Session.retained_messages``,
   an ``asyncio.Queue`` of ``ApplicationMessage``). amqtt forwards them with the retain flag
   set; they are ordinary forwarded messages, so ours clears it (a subscriber that ignores
   retained messages, like the renewal service, must not ignore them).
4. ``Broker._publish_retained_messages_for_subscription((filter, qos), session)`` — called
   for each new subscription and, at CONNECT, for *every* filter in the broker. amqtt then
   replays retained messages matching any filter, with no receive check: a device would get
   other devices' retained telemetry. Ours sends only for a filter the session holds, and
   only what the ACL lets it receive.
5. ``Session.keep_alive`` — when > 0, amqtt's handler wraps every packet read in
   ``asyncio.wait_for`` (a task each) and re-arms a timer per packet sent, yet ignores the
   expiry. :func:`tune_session` hands the keep-alive to our connection and sets it to 0;
   amqtt reads it when the handler starts, after authentication.
6. ``Session.delivered_message_queue`` — a client's PUBLISHes amqtt has acknowledged but not
   yet routed (amqtt PUBACKs a QoS 1 message when it queues it). Its ``qsize`` is our
   reader's backpressure signal. ``Broker._client_message_loop(session, handler)`` ends at
   the disconnect and amqtt drops what is still queued there: acknowledged, never routed
   (a client that disconnects at its last PUBACK, as ``mosquitto_pub -l`` does, lost 1-2 %
   of its messages); its ``_session_monitor`` also empties the queue of a disconnected
   clean session within a second. Ours takes what is queued at the start of
   ``Broker._handle_disconnect(session, handler, waiter)`` (before amqtt's first await) and
   routes it once amqtt's loop has returned, after the message the loop itself still
   routes.

7. ``Session.inflight_out`` — the QoS 1/2 messages sent to a client and not yet acknowledged
   (an ``OrderedDict`` of messages with ``topic``, ``data``, ``qos``). amqtt drops them when
   the connection ends; :meth:`CertfleetBroker.capture_inflight`
   (:func:`broker.amqtt_state.capture_inflight`) reads them just before a
   shutdown closes the connections, so the saved state keeps them (redelivered after the
   restart: at least once).
8. ``Session.clean_session`` / ``is_anonymous`` / ``last_disconnect_time`` and
   ``Session.transitions.state`` — which sessions amqtt keeps and queues for while their
   client is away (clean session off, not anonymous, state not ``connected``), and when
   ``_session_monitor`` expires them (``last_disconnect_time`` + ``session_expiry_interval``).
9. ``Broker._broadcast_queue`` empty and every session's ``delivered_message_queue`` empty
   means every accepted message is routed (:meth:`CertfleetBroker.wait_routed`).

A persistent session is restored with public calls (:mod:`broker.amqtt_state`, the
adapter's persistence, says which).

Items 10-15, what a cluster node relies on beyond these, are listed in
:mod:`broker.amqtt_cluster_routing` (:class:`~broker.amqtt_cluster_routing.ClusterBroker`,
the cluster's side of the broker seam, :mod:`broker.broker_port`); 16-18 hold on every node:

16. ``BrokerProtocolHandler._pending_subscriptions`` / ``_pending_unsubscriptions`` — the
    queues of SUBSCRIBE and UNSUBSCRIBE packets the client loop has not handled yet. amqtt's
    loop takes one PUBLISH per pass (a task for ``mqtt_deliver_next_message`` and an
    ``asyncio.wait`` over four futures each time); ours routes the PUBLISHes already queued
    behind it in the same pass while neither queue holds anything.

17. Shared subscriptions (:mod:`broker.shared_subscriptions`): ``$share/...`` filters are
    taken by ``add_subscription`` / ``_del_subscription`` before amqtt sees them (never in
    ``subscriptions``, so amqtt's routing and retained replay skip them), and
    ``Broker._del_all_subscriptions(session)`` — what amqtt calls when it deletes a
    session — is wrapped to drop the session's memberships too. Every admitted message
    reaches the groups from ``_broadcast_message``; a member's delivery is
    ``handler.mqtt_publish``, which raises ``CancelledError`` when amqtt cancels its PUBACK
    waiters at the connection's end (``ProtocolHandler._stop_waiters``) and
    ``TimeoutError`` after 5 s without a PUBACK: either hands the message to another member.

18. ``Broker._session_monitor()`` — amqtt's expiry pass, once a second: it reads every
    session's ``transitions.state`` in two list comprehensions without handing the loop
    back, 20-50 ms at 10,000 connected sessions, so every connection of the node waited that
    long each second (found in round 11 by sampling the loop during the 1M benchmark's
    storm). Ours applies the same rules (item 8) to :data:`MONITOR_SLICE` sessions at a time
    and hands the loop back between slices; a session is removed only if it is still the one
    under its client id and still expired when its turn comes.

Renewal messages (``devices/<id>/cert/renew|issued``) published with retain are routed to
the subscribers they have now but never stored (``retain_message`` is public): a stored CSR
would be replayed to the registry at every resubscribe.

Plugins are wired when amqtt builds them: the objects they need (:class:`ConnectGate`,
:class:`TopicAcl`) travel in their ``Config`` dataclass, amqtt's documented plugin
configuration, so no plugin exists unbound and nobody scans amqtt's plugin list.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker import amqtt_state
from broker.acl import TopicAcl
from broker.connection import TlsConnection
from broker.gate import ConnectGate
from broker.shared_subscriptions import SharedSubscriptionError, SharedSubscriptions, parse_share
from broker.state import BrokerState, StoredMessage
from fleetcore.topics import is_renewal_topic, topic_matches

__all__ = [
    "LISTENER_NAME",
    "SESSION_EXPIRY_S",
    "AclTopicPlugin",
    "CertfleetBroker",
    "GateAuthPlugin",
    "never_retained",
    "tune_session",
]

log = logging.getLogger(__name__)

#: Name of the amqtt listener (type ``external``) our connections are handed to.
LISTENER_NAME = "default"
#: Persistent (clean_session=0) sessions whose client went away are dropped after an hour,
#: so their queued QoS 1 messages cannot grow without bound.
SESSION_EXPIRY_S = 3600
#: How long shutdown waits for deliveries still running (amqtt's own figure).
_SHUTDOWN_WAIT_S = 5.0
#: Sessions the expiry monitor checks between hand-backs to the loop (item 18; well under a
#: millisecond).
MONITOR_SLICE = 256
#: How often the expiry monitor runs (amqtt's own period).
_MONITOR_EVERY_S = 1.0


def tune_session(session: Session, connection: TlsConnection) -> None:
    """Attach an amqtt session to the connection that carries it: the reader gets the
    session's routing backlog (backpressure), the connection takes the keep-alive over."""
    reader = connection.reader
    if reader is None:
        return
    reader.backlog = session.delivered_message_queue.qsize
    connection.enforce_keepalive(session.keep_alive)
    session.keep_alive = 0


class GateAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt's authentication step: the session must belong to a connection the
    :class:`ConnectGate` admitted, and that connection's certificate must pass the policy
    again (defence in depth).

    The certificate checked is the claimed connection's: amqtt keeps the *first*
    connection's ``ssl_object`` on a persistent session that reconnects, which may be an
    older certificate than the one presented now.
    """

    @dataclass
    class Config:
        """Wired by :class:`CertfleetBroker`; amqtt refuses to build the plugin without."""

        gate: ConnectGate

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._gate: ConnectGate = self.config.gate

    async def authenticate(self, *, session: Session) -> bool | None:
        connection = self._gate.claim(session.client_id)
        if connection is None or connection.peer_certificate_der is None:
            log.warning("client refused by auth plugin reason=not_admitted_by_gate")
            return False
        tune_session(session, connection)
        return self._gate.recheck(connection.peer_certificate_der, session.client_id)


class AclTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """The topic ACL through amqtt's ordinary plugin path; the fallback behind
    :meth:`CertfleetBroker._topic_filtering`, which asks the same ACL directly."""

    @dataclass
    class Config:
        """Wired by :class:`CertfleetBroker`."""

        acl: TopicAcl

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._acl: TopicAcl = self.config.acl

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        return self._acl.check(session.client_id if session else None, topic, action)


def amqtt_config(
    gate: ConnectGate, acl: TopicAcl, session_expiry_s: int = SESSION_EXPIRY_S
) -> dict[str, Any]:
    """amqtt configuration: one external listener (ours), our two plugins, wired."""
    return {
        "listeners": {LISTENER_NAME: {"type": "external"}},
        "session_expiry_interval": session_expiry_s,
        "plugins": {
            f"{__name__}.GateAuthPlugin": {"gate": gate},
            f"{__name__}.AclTopicPlugin": {"acl": acl},
        },
    }


def never_retained(topic_name: str | None, data: bytes | bytearray | None) -> bool:
    """Whether a retained message is refused: renewal messages are routed, never stored
    (a stored CSR would be replayed to the registry at every resubscribe)."""
    return bool(data) and topic_name is not None and is_renewal_topic(topic_name)


def _ignore_error(_exc: BaseException) -> None:
    """Default route-error hook."""


def _ignore() -> None:
    """Default retain-refused hook."""


class CertfleetBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """The amqtt broker certfleet runs (build it on the running loop).

    ``on_route_error`` is told about every message whose routing raised, and
    ``on_retain_refused`` about every retained renewal message that was not stored (the
    metrics count both).
    """

    def __init__(
        self,
        *,
        gate: ConnectGate,
        acl: TopicAcl,
        session_expiry_s: int = SESSION_EXPIRY_S,
        on_route_error: Callable[[BaseException], None] = _ignore_error,
        on_retain_refused: Callable[[], None] = _ignore,
    ) -> None:
        super().__init__(amqtt_config(gate, acl, session_expiry_s))
        self.acl = acl
        self._on_route_error = on_route_error
        self._on_retain_refused = on_retain_refused
        #: What a disconnecting client left queued, until its message loop has returned.
        self._left_behind: dict[Any, list[Any]] = {}
        #: ``$share/<group>/<filter>`` subscriptions (item 17).
        self.shared = SharedSubscriptions(
            handler_of=self._handler_of,
            may_receive=lambda session, topic: acl.check(session.client_id, topic, Action.RECEIVE),
            spawn=self._tasks_queue.append,
        )

    async def serve(self, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """Run one admitted client's MQTT session until it ends (public amqtt hook)."""
        await self.external_connected(reader, writer, LISTENER_NAME)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if never_retained(topic_name, data):
            client_id = source_session.client_id if source_session is not None else None
            log.warning(
                "retain refused client_id=%s topic=%r (renewal messages are never retained)",
                client_id,
                (topic_name or "")[:200],
            )
            self._on_retain_refused()
            return
        await super().retain_message(source_session, topic_name, data, qos)

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        if not await self._route_one(client_session, handler, wait_deliver):
            return False
        # amqtt's client loop makes a task and an asyncio.wait over four futures for every
        # message it takes off the queue: what is queued already is routed here, back to
        # back, until the loop has something else to do (item 16).
        queue = client_session.delivered_message_queue
        while not queue.empty() and _only_publishes_pending(handler):
            if not await self._route_one(client_session, handler, _taken(queue.get_nowait())):
                return False
        return True

    async def _route_one(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        """amqtt's routing of one message a client sent."""
        delivered = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return bool(delivered)

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if topic and data is not None and self.shared.groups_or_remote:
            await self.shared.route(topic, bytes(data), force_qos)  # item 17
        await self._queue_broadcast(session, topic, data, force_qos)

    async def _queue_broadcast(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None,
    ) -> None:
        """amqtt's own: queue the message for routing (a cluster node's adds to it)."""
        await super()._broadcast_message(session, topic, data, force_qos)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        try:
            share = parse_share(subscription[0])
        except SharedSubscriptionError as exc:
            log.warning("subscription refused client_id=%s error=%s", session.client_id, exc)
            return 0x80
        if share is not None:  # item 17: the ACL checks the filter inside $share
            if not self.acl.check(session.client_id, share.topic_filter, Action.SUBSCRIBE):
                return 0x80
            return self.shared.join(share, session, subscription[1])
        return await self._add_plain_subscription(subscription, session)

    async def _add_plain_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's own subscription (a cluster node's tells the cluster)."""
        return int(await super().add_subscription(subscription, session))

    async def _del_all_subscriptions(self, session: Session) -> None:
        await super()._del_all_subscriptions(session)
        self.shared.leave_all(session)  # item 17: the session is deleted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        try:
            share = parse_share(a_filter)
        except SharedSubscriptionError:
            return 0
        if share is not None:
            return int(self.shared.leave(share, session))
        return self._del_plain_subscription(a_filter, session)

    def _del_plain_subscription(self, a_filter: str, session: Session) -> int:
        """amqtt's own unsubscription (a cluster node's tells the cluster)."""
        return int(super()._del_subscription(a_filter, session))

    # -- persistent state (broker.state; the work is broker.amqtt_state's) -----------------

    def capture_inflight(self) -> dict[str, list[StoredMessage]]:
        """The messages sent to persistent sessions' clients and not yet acknowledged, by
        session key (amqtt forgets them when the connection ends: take them first)."""
        return amqtt_state.capture_inflight(self)

    def persistent_state(
        self, inflight: Mapping[str, Sequence[StoredMessage]] | None = None
    ) -> BrokerState:
        """Every persistent session and every retained message, as plain values
        (:func:`broker.amqtt_state.persistent_state`). Loop thread only; does not yield."""
        return amqtt_state.persistent_state(self, inflight)

    async def restore_state(self, state: BrokerState) -> int:
        """Recreate the persistent sessions (offline) and the retained messages of ``state``;
        before the listener starts. Returns the sessions restored."""
        return await amqtt_state.restore_state(self, state)

    def discard_session(self, key: str) -> bool:
        """Forget a session that is not connected: its subscriptions and queued messages
        (a decommissioned device's). False when there is none or its client is connected."""
        return amqtt_state.discard_session(self, key)

    async def wait_routed(self, timeout_s: float = 5.0) -> bool:
        """Wait until every message amqtt accepted is routed (queued for an offline
        persistent session or handed to a connected client's delivery); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self._broadcast_queue.empty() and not any(
                session.delivered_message_queue.qsize() for session, _ in self.sessions.values()
            ):
                await asyncio.sleep(0.01)  # the item being routed now, if any, completes
                if self._broadcast_queue.empty():
                    return True
            await asyncio.sleep(0.01)
        return False

    def _handler_of(self, session: Session) -> Any:
        """The protocol handler of a session (public ``sessions`` property)."""
        if not session.client_id:
            return None
        return self.sessions.get(session.client_id, (None, None))[1]

    # -- private amqtt methods overridden (items 1-4 of the module docstring) --------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        return self.acl.check(session.client_id, topic, action)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._handler_of(session)
        if handler is None:
            return
        queued = []
        while not session.retained_messages.empty():
            message = session.retained_messages.get_nowait()
            queued.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(message.topic, message.data, message.qos, retain=False)
                )
            )
        if queued:
            await asyncio.wait(queued)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        if not any(s is session for s, _ in self.subscriptions.get(topic_filter, ())):
            return  # amqtt asks for every filter in the broker at CONNECT
        handler = self._handler_of(session)
        if handler is None:
            return
        sends = [
            asyncio.ensure_future(
                handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
            )
            for topic, retained in list(self.retained_messages.items())
            if topic_matches(topic, topic_filter)
            and self.acl.check(session.client_id, topic, Action.RECEIVE)
        ]
        if sends:
            await asyncio.wait(sends)

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        try:
            await super()._client_message_loop(client_session, handler)
        finally:
            left = self._left_behind.pop(handler, [])
        left += _take_all(client_session.delivered_message_queue)
        await self._route_left_behind(client_session, handler, left)

    async def _handle_disconnect(
        self, client_session: Session, handler: Any, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        # Taken before amqtt's first await: its session monitor empties the queue of a
        # disconnected clean session, and the loop's delivery waiter could take one more
        # message that nobody routes (item 6).
        self._left_behind[handler] = _take_all(client_session.delivered_message_queue)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _delete_session(self, client_id: str) -> None:
        # A clean-session CONNECT of an id still connected (a takeover) deletes the old
        # session, and amqtt empties its queue (``clear_queues``) while the old connection's
        # PUBLISHes may still be in it, PUBACKed: route them first (item 6; a takeover mid
        # burst lost 32 acknowledged messages this way in one run of
        # tests/faults/test_broker_publisher_leaves.py).
        entry = self._sessions.get(client_id)
        if entry is not None and entry[1] is not None:
            session, handler = entry
            left = _take_all(session.delivered_message_queue)
            if left:
                await self._route_left_behind(session, handler, left)
        await super()._delete_session(client_id)

    async def _session_monitor(self) -> None:
        """amqtt's expiry of disconnected sessions (item 18), a slice at a time."""
        while True:
            entries = list(self._sessions.items())
            for start in range(0, len(entries), MONITOR_SLICE):
                now = time.time()
                for client_id, (session, _handler) in entries[start : start + MONITOR_SLICE]:
                    current = self._sessions.get(client_id)
                    if (
                        current is not None
                        and current[0] is session
                        and self._expired(session, now)
                    ):
                        await self._cleanup_session(client_id)
                await asyncio.sleep(0)
            await asyncio.sleep(_MONITOR_EVERY_S)

    def _expired(self, session: Session, now: float) -> bool:
        """amqtt's rules (item 8): a disconnected clean or anonymous session at once, a
        persistent one ``session_expiry_interval`` after its disconnect."""
        if session.transitions.state != "disconnected":
            return False
        if session.is_anonymous or session.clean_session:
            return True
        expiry = self.config.session_expiry_interval
        if expiry is None or not session.last_disconnect_time:
            return False
        return bool(session.last_disconnect_time < math.floor(now - expiry))

    async def _route_left_behind(self, session: Session, handler: Any, messages: list[Any]) -> None:
        """Route, in order, the PUBLISHes a client left queued when it went away (item 6)."""
        for message in messages:
            try:
                await self._handle_message_delivery(session, handler, _taken(message))
            except Exception as exc:  # noqa: BLE001 - route the others
                log.warning("message routing failed error=%s", f"{exc!r}"[:200])
                self._on_route_error(exc)

    async def _broadcast_loop(self) -> None:
        running: deque[asyncio.Task[object]] = self._tasks_queue
        queue: asyncio.Queue[dict[str, object]] = self._broadcast_queue
        try:
            while not self._broadcast_shutdown_waiter.done():
                while running and running[0].done():
                    _log_failed(running.popleft())
                if not queue.empty():
                    try:
                        await self._run_broadcast(running)  # takes the next item at once
                    except Exception as exc:  # noqa: BLE001 - one bad message must not stop routing
                        log.warning("message routing failed error=%s", f"{exc!r}"[:200])
                        self._on_route_error(exc)
                    continue
                shutdown = self._broadcast_shutdown_waiter
                route_next = asyncio.ensure_future(self._run_broadcast(running))
                done, _ = await asyncio.wait(
                    [route_next, shutdown], return_when=asyncio.FIRST_COMPLETED
                )
                if shutdown in done:
                    route_next.cancel()
                    await asyncio.gather(route_next, return_exceptions=True)
                    break
                failure = route_next.exception()
                if failure is not None:
                    log.warning("message routing failed error=%s", f"{failure!r}"[:200])
                    self._on_route_error(failure)
        finally:
            for task in running:
                if not task.done():
                    task.cancel()
            if running:
                done, pending = await asyncio.wait(running, timeout=_SHUTDOWN_WAIT_S)
                for task in done:
                    _log_failed(task)
                if pending:
                    log.warning("broadcast tasks still pending at shutdown count=%d", len(pending))


def _only_publishes_pending(handler: Any) -> bool:
    """Whether the client's loop has nothing but PUBLISHes to handle: no SUBSCRIBE or
    UNSUBSCRIBE waiting (their order against the client's PUBLISHes stays amqtt's)."""
    return bool(handler._pending_subscriptions.empty() and handler._pending_unsubscriptions.empty())


def _taken(message: Any) -> asyncio.Future[Any]:
    """``message`` as amqtt's loop hands it to ``_handle_message_delivery``: a done future."""
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    waiter.set_result(message)
    return waiter


def _take_all(queue: asyncio.Queue[Any]) -> list[Any]:
    """Everything in ``queue`` now, in order (no await: nothing else runs meanwhile)."""
    taken = []
    while not queue.empty():
        taken.append(queue.get_nowait())
    return taken


def _log_failed(task: asyncio.Task[object]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("message delivery failed error=%s", f"{type(exc).__name__}: {exc}"[:200])
