"""amqtt's Broker with two hot spots of its per-message path taken off the slow road, and
two holes in its retained-message paths closed.

1. Topic checks. amqtt asks topic plugins through ``PluginManager.map_plugin_topic``, which
wraps each call in a task and gathers the results, twice for every routed message (the
publisher's PUBLISH and each subscriber's RECEIVE). Our ACL (:mod:`broker.acl`) is a pure,
synchronous function of the session's identity and the topic, so :class:`CertfleetBroker`
calls the bound :class:`~broker.acl.DeviceTopicPlugin` directly. The plugin stays
registered with amqtt (and would answer through the ordinary path if unbound).

2. The broadcast loop. amqtt's ``_broadcast_loop`` wraps *every* message in a new task and
an ``asyncio.wait`` (so that it can notice shutdown while blocked on the queue). Ours routes
queued messages back to back while there is a backlog and takes amqtt's waiting path only
when the queue is empty; shutdown, task bookkeeping and error handling are amqtt's.

3. Retained messages at CONNECT. amqtt replays, to every client that connects, the retained
messages matching *any* subscription filter in the broker (not only the client's own), with
no receive check: a device would get other devices' retained telemetry. Ours sends a retained
message only for a filter the session holds, and only if the ACL lets it receive the topic.

4. A persistent session's queue. Messages queued while a clean-session-off client was away
are forwarded with the retain flag set by amqtt; they are ordinary forwarded messages
(MQTT-3.1.2-... "retain 0 when sent to an established subscription"), so ours clears it:
a subscriber that ignores retained messages (renewal requests) must not ignore them.

5. Retained renewal messages. A PUBLISH (or will) with retain on ``devices/<id>/cert/renew``
or ``.../cert/issued`` is routed to the subscribers it has now, but never stored: a stored
CSR would be replayed to the registry at every resubscribe (issue 11.6). ``retain_message``
is amqtt's public method for storing one.

A message whose routing raises is logged and counted; the broadcast loop goes on (a loop
that died would stop all routing, silently).

All override private methods of amqtt 0.12 (pinned ``<0.13`` in pyproject.toml); the broker
tests exercise every path.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import _BROADCAST_SHUTDOWN_TIMEOUT, Broker
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import INCOMING, IncomingApplicationMessage, OutgoingApplicationMessage, Session

from broker.acl import DeviceTopicPlugin
from fleetcore.topics import is_renewal_topic

__all__ = ["CertfleetBroker", "ClusterHooks", "StoreAckHandler"]

log = logging.getLogger(__name__)

#: The store future of the QoS 1 message being routed (set per client task).
_STORED: ContextVar[asyncio.Future[bool] | None] = ContextVar("certfleet_stored", default=None)


class ClusterHooks(Protocol):
    """What a cluster node (:mod:`broker.cluster`) adds to the broker's message paths."""

    async def forward(
        self, topic: str, data: bytes, force_qos: int | None, stored: asyncio.Future[bool] | None
    ) -> None:
        """A local client's admitted message; a QoS 1 one resolves ``stored`` once it is
        stored durably (its PUBACK waits for that)."""

    def served_from_store(self, session: Session, sub_qos: int) -> bool:
        """Whether this subscription gets its messages from the cluster's store only."""

    async def subscribed(self, session: Session, topic_filter: str, qos: int) -> bool:
        """A subscription was granted; False refuses it (SUBACK 0x80)."""

    def unsubscribed(self, session: Session, topic_filter: str) -> None:
        """A subscription was removed."""

    def session_started(self, session: Session, handler: BrokerProtocolHandler) -> None:
        """A client's session is connected on this node and its handler runs."""


class StoreAckHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt ships no hints
    """amqtt's handler, with the PUBACK of an incoming QoS 1 message sent only once the
    cluster stored it (amqtt sends it when the message is queued). No state of its own:
    the broker swaps an amqtt handler's class to this one."""

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != INCOMING or app_message.qos != QOS_1 or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        if app_message.packet_id is None or app_message.puback_packet:
            await super()._handle_qos1_message_flow(app_message)
            return
        waiters: dict[int, asyncio.Future[bool]] = self.__dict__.setdefault("store_waiters", {})
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters[id(app_message)] = stored
        try:
            await self.session.delivered_message_queue.put(app_message)
            await stored
        finally:
            waiters.pop(id(app_message), None)
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback


class CertfleetBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """The amqtt broker certfleet runs."""

    _acl: DeviceTopicPlugin | None = None
    _on_route_error: Callable[[BaseException], None] = staticmethod(lambda _exc: None)

    def use_topic_plugin(self, plugin: DeviceTopicPlugin) -> None:
        self._acl = plugin

    @property
    def topic_plugin(self) -> DeviceTopicPlugin | None:
        return self._acl

    _on_retain_refused: Callable[[], None] = staticmethod(lambda: None)

    def on_retain_refused(self, hook: Callable[[], None]) -> None:
        """Told about every retained renewal message that was not stored."""
        self._on_retain_refused = hook

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if data and topic_name is not None and is_renewal_topic(topic_name):
            client_id = source_session.client_id if source_session is not None else None
            log.warning(
                "retain refused client_id=%s topic=%r (renewal messages are never retained)",
                client_id,
                topic_name[:200],
            )
            self._on_retain_refused()
            return
        await super().retain_message(source_session, topic_name, data, qos)
        if self._share_retained is not None and source_session is not None and topic_name:
            await self._share_retained(topic_name, bytes(data or b""), qos)

    _share_retained: Callable[[str, bytes, int | None], Awaitable[None]] | None = None

    def share_retained_with(
        self, share: Callable[[str, bytes, int | None], Awaitable[None]]
    ) -> None:
        """Hand every retained message a local client set (or cleared) to ``share``: the
        cluster's retained store (:mod:`broker.cluster.retained`)."""
        self._share_retained = share

    _cluster: ClusterHooks | None = None

    def use_cluster(self, hooks: ClusterHooks) -> None:
        """Run as a cluster node (:mod:`broker.cluster`): every locally admitted message is
        handed to ``hooks.forward`` too, a QoS 1 PUBACK waits for ``hooks`` to store it,
        and persistent sessions' QoS 1 subscriptions are served from the cluster's store."""
        self._cluster = hooks

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        if self._cluster is not None:
            # amqtt builds its handler by class name; ours only changes when PUBACK is sent.
            handler.__class__ = StoreAckHandler
        return handler, session

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        waiters: dict[int, asyncio.Future[bool]] = getattr(handler, "store_waiters", {})
        message = wait_deliver.result()
        stored = waiters.get(id(message)) if message is not None else None
        token = _STORED.set(stored)
        try:
            delivered = await super()._handle_message_delivery(
                client_session, handler, wait_deliver
            )
            return bool(delivered)
        finally:
            taken = _STORED.get() is None
            _STORED.reset(token)
            if stored is not None and not taken and not stored.done():
                stored.set_result(True)  # refused by the ACL (acknowledged, never routed)

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        await super()._broadcast_message(session, topic, data, force_qos)
        if self._cluster is not None and session is not None and topic and data is not None:
            stored = _STORED.get()
            _STORED.set(None)  # taken: the cluster resolves it once the message is stored
            await self._cluster.forward(topic, bytes(data), force_qos, stored)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted = int(await super().add_subscription(subscription, session))
        if (
            self._cluster is not None
            and granted != 0x80
            and not await self._cluster.subscribed(session, subscription[0], granted)
        ):
            super()._del_subscription(subscription[0], session)
            return 0x80
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = int(super()._del_subscription(a_filter, session))
        if deleted and self._cluster is not None:
            self._cluster.unsubscribed(session, a_filter)
        return deleted

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[object]]) -> None:
        cluster = self._cluster
        if cluster is None:
            await super()._run_broadcast(running_tasks)
            return
        # amqtt's own loop body, plus one rule: a persistent session's QoS 1 subscription is
        # served from the cluster's store (JetStream) only, connected or not, so it never
        # gets a message twice and nothing waits in this process's memory for it.
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for topic_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, topic_filter):
                continue
            for target, sub_qos in list(subscriptions):
                if cluster.served_from_store(target, sub_qos):
                    continue
                if not await self._topic_filtering(target, topic, Action.RECEIVE):
                    continue
                if target.transitions.state != "connected":
                    continue
                handler = self._get_handler(target)
                if handler is not None:
                    qos = broadcast.get("qos", sub_qos)
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )

    def deliver_remote(self, topic: str, data: bytes, force_qos: int | None) -> None:
        """Route a message another node admitted to this node's subscribers (each one's
        RECEIVE check applies); it is not forwarded again."""
        broadcast: dict[str, object] = {"session": None, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        self._broadcast_queue.put_nowait(broadcast)

    def on_route_error(self, hook: Callable[[BaseException], None]) -> None:
        """Told about every message whose routing raised (the metrics count them)."""
        self._on_route_error = hook

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        if self._cluster is not None:
            self._cluster.session_started(session, handler)
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
        if not any(s is session for s, _ in self._subscriptions.get(topic_filter, ())):
            return  # amqtt asks for every filter in the broker at CONNECT
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = [
            asyncio.ensure_future(
                handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
            )
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
            and await self._topic_filtering(session, topic, Action.RECEIVE)
        ]
        if sends:
            await asyncio.wait(sends)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        acl = self._acl
        if acl is None:
            return bool(await super()._topic_filtering(session, topic, action))
        return acl.check(session, topic, action)

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
                done, pending = await asyncio.wait(running, timeout=_BROADCAST_SHUTDOWN_TIMEOUT)
                for task in done:
                    _log_failed(task)
                if pending:
                    log.warning("broadcast tasks still pending at shutdown count=%d", len(pending))


def _log_failed(task: asyncio.Task[object]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("message delivery failed error=%s", f"{type(exc).__name__}: {exc}"[:200])
