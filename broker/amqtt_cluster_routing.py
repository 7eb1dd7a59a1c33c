"""amqtt, adapted for a cluster node: :class:`ClusterBroker` routes through the cluster's
:class:`~broker.broker_port.ClusterHooks` and is the cluster's
:class:`~broker.broker_port.BrokerPort` (the seam: docs/cluster.md, "The broker seam").

The single-node broker (:class:`broker.amqtt_adapter.CertfleetBroker`, items 1-9, 16 and 17
of its docstring) is extended here with what a cluster node relies on inside amqtt 0.12
beyond that (items 10-15, pinned by ``tests/broker/test_amqtt_adapter_pins.py`` as well):

10. ``Broker._initialize_client_session`` returns amqtt's ``BrokerProtocolHandler``, and
    the session whose ``parent`` is CONNACK's session-present flag (set to 1 when the
    cluster holds the client's persistent session from another node); the handler's
    class is swapped to :class:`StoreAckHandler`, whose only change is
    ``_handle_qos1_message_flow`` for incoming messages: the PUBACK waits until the cluster
    stored the message (amqtt sends it when the message is queued).
11. ``Broker._handle_message_delivery(session, handler, waiter)`` — routes one message a
    client sent (``waiter.result()`` is the ``IncomingApplicationMessage``); wrapped to hand
    the message's store future to the cluster, resolved at once if the ACL refused it.
12. ``Broker._broadcast_message(session, topic, data, force_qos)`` — queues a message for
    routing (a client's publish or a will) as a ``{"session", "topic", "data"[, "qos"]}``
    dict on ``_broadcast_queue``; in cluster mode its four lines are ours, adding
    ``"stored"`` (the message goes to JetStream), then the message is forwarded to the
    other nodes.
13. ``Broker.add_subscription((filter, qos), session)`` / ``_del_subscription(filter,
    session)`` — wrapped to tell the cluster which filters this node's clients hold
    (the NATS interest) and to keep a persistent session's subscriptions in the cluster.
14. ``Broker._run_broadcast(running)`` — in cluster mode replaced by the same routing with
    two more rules: a persistent session's QoS 1 subscription gets a stored message from
    JetStream only (any other live), and another node's message, which arrives for one
    local filter (``"filter"``), goes only to that filter's subscribers.
15. The port's side (:class:`AmqttClient`, :class:`ClusterBroker`'s port methods):
    ``Broker.subscriptions`` is read and mutated (a persistent session resumed on this node
    gets its filters back), ``Broker.retained_messages`` is filled from the cluster's store,
    a session's handler is found through the public ``sessions`` mapping, its state is
    ``Session.transitions.state`` and a delivery is ``handler.mqtt_publish``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextvars import ContextVar
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import INCOMING, IncomingApplicationMessage, OutgoingApplicationMessage, Session

from broker.amqtt_adapter import CertfleetBroker, never_retained
from broker.amqtt_session import is_connected, publish
from broker.broker_port import ClusterHooks, LocalClient, ShareRetained
from broker.errors import BrokerError
from fleetcore.topics import topic_matches

__all__ = ["AmqttClient", "ClusterBroker", "StoreAckHandler"]

#: The store future of the QoS 1 message being routed (set per client task).
_STORED: ContextVar[asyncio.Future[bool] | None] = ContextVar("certfleet_stored", default=None)


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


class AmqttClient:
    """An amqtt session bound to one protocol handler (its connection): the
    :class:`~broker.broker_port.LocalClient` the cluster sees."""

    __slots__ = ("_broker", "_handler", "_session")

    def __init__(self, broker: ClusterBroker, session: Session, handler: Any) -> None:
        self._broker = broker
        self._session = session
        self._handler = handler

    @property
    def key(self) -> str | None:
        key: str | None = self._session.client_id
        return key

    @property
    def persistent(self) -> bool:
        return not self._session.clean_session

    @property
    def connected(self) -> bool:
        return is_connected(self._session)

    @property
    def attached(self) -> bool:
        handler = self._handler
        return handler is not None and self._broker._handler_of(self._session) is handler

    @property
    def live(self) -> bool:
        return self.attached and self.connected

    def current(self) -> AmqttClient | None:
        handler = self._broker._handler_of(self._session)
        return None if handler is None else AmqttClient(self._broker, self._session, handler)

    def filters(self) -> dict[str, int]:
        session = self._session
        return {
            topic_filter: qos
            for topic_filter, subscribers in list(self._broker.subscriptions.items())
            for subscriber, qos in subscribers
            if subscriber is session
        }

    def restore_filter(self, topic_filter: str, qos: int) -> None:
        subscribers = self._broker.subscriptions.setdefault(topic_filter, [])
        if all(s.client_id != self._session.client_id for s, _ in subscribers):
            subscribers.append((self._session, qos))

    def may_receive(self, topic: str) -> bool:
        return self._broker.acl.check(self._session.client_id, topic, Action.RECEIVE)

    async def deliver(self, topic: str, data: bytes, qos: int) -> None:
        if self._handler is None:
            raise BrokerError(f"client_id={self._session.client_id} has no connection here")
        await publish(self._handler, topic, data, qos)


class ClusterBroker(CertfleetBroker):
    """The broker of a cluster node: :class:`CertfleetBroker` plus the cluster's paths
    (items 10-14), and the :class:`~broker.broker_port.BrokerPort` of its cluster side
    (item 15). Until :meth:`use_cluster` it routes as a single node."""

    _cluster: ClusterHooks | None = None
    _share_retained: ShareRetained | None = None

    def use_cluster(self, hooks: ClusterHooks) -> None:
        """Run as a cluster node (:mod:`broker.cluster`): every locally admitted message is
        handed to ``hooks.forward`` too, a QoS 1 PUBACK waits for ``hooks`` to store it,
        and persistent sessions' QoS 1 subscriptions are served from the cluster's store."""
        self._cluster = hooks

    def share_retained_with(self, share: ShareRetained) -> None:
        """Hand every retained message a local client set (or cleared) to ``share``: the
        cluster's retained store (:mod:`broker.cluster.retained`)."""
        self._share_retained = share

    def client_of(self, session: Session) -> AmqttClient:
        """``session`` bound to the handler that carries it now (None: its client is away)."""
        return AmqttClient(self, session, self._handler_of(session))

    # -- the port (item 15) ---------------------------------------------------------------

    def connected_clients(self) -> list[LocalClient]:
        clients: list[LocalClient] = []
        for session, handler in list(self.sessions.values()):
            if session.client_id and handler is not None:
                client = AmqttClient(self, session, handler)
                if client.live:
                    clients.append(client)
        return clients

    def has_subscribers(self, topic_filter: str) -> bool:
        return bool(self.subscriptions.get(topic_filter))

    def put_retained(self, topic: str, data: bytes, qos: int) -> None:
        if not data:
            self.retained_messages.pop(topic, None)
            return
        self.retained_messages[topic] = RetainedApplicationMessage(None, topic, data, qos)

    def deliver_remote(
        self, topic: str, data: bytes, force_qos: int | None, topic_filter: str, stored: bool
    ) -> None:
        """Route a message another node admitted to this node's subscribers of
        ``topic_filter`` (each one's RECEIVE check applies); it is not forwarded again.
        ``stored``: it is in JetStream too, so persistent QoS 1 subscriptions get it there."""
        broadcast: dict[str, object] = {
            "session": None,
            "topic": topic,
            "data": data,
            "filter": topic_filter,
            "stored": stored,
        }
        if force_qos is not None:
            broadcast["qos"] = force_qos
        self._broadcast_queue.put_nowait(broadcast)

    # -- amqtt's paths, with the cluster's rules (items 10-14) ----------------------------

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        await super().retain_message(source_session, topic_name, data, qos)
        if never_retained(topic_name, data):
            return
        if self._share_retained is not None and source_session is not None and topic_name:
            await self._share_retained(topic_name, bytes(data or b""), qos)

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        if self._cluster is not None:
            # amqtt builds its handler by class name; ours only changes when PUBACK is sent.
            handler.__class__ = StoreAckHandler
            # A persistent session made on another node: CONNACK's session present
            # (amqtt's ``parent``) says so; its filters are restored as it starts.
            resumable = not session.clean_session and not session.parent and session.client_id
            if resumable and await self._cluster.stored_session(session.client_id):
                session.parent = 1
        return handler, session

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._handler_of(session)
        if handler is not None and self._cluster is not None:
            self._cluster.session_started(AmqttClient(self, session, handler))
        await super()._publish_session_retained_messages(session)

    async def _route_one(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        """amqtt's routing of one message a client sent, with its store future (item 11)."""
        waiters: dict[int, asyncio.Future[bool]] = getattr(handler, "store_waiters", {})
        message = wait_deliver.result()
        stored = waiters.get(id(message)) if message is not None else None
        token = _STORED.set(stored)
        try:
            return await super()._route_one(client_session, handler, wait_deliver)
        finally:
            taken = _STORED.get() is None
            _STORED.reset(token)
            if stored is not None and not taken and not stored.done():
                stored.set_result(True)  # refused by the ACL (acknowledged, never routed)

    async def _queue_broadcast(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None,
    ) -> None:
        cluster = self._cluster
        if cluster is None or session is None or not topic or data is None:
            await super()._queue_broadcast(session, topic, data, force_qos)
            return
        stored = _STORED.get()
        _STORED.set(None)  # taken: the cluster resolves it once the PUBACK may go
        qos1 = stored is not None or (force_qos or 0) >= 1
        durable = qos1 and cluster.needs_store(topic)
        # amqtt's own _broadcast_message, plus whether the message goes to the store: a
        # persistent QoS 1 subscription then gets it from there, and live otherwise.
        broadcast: dict[str, object] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        broadcast["stored"] = durable
        await self._broadcast_queue.put(broadcast)
        await cluster.forward(topic, bytes(data), force_qos, stored, durable)

    async def _add_plain_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted = await super()._add_plain_subscription(subscription, session)
        cluster = self._cluster
        if (
            cluster is not None
            and granted != 0x80
            and not await cluster.subscribed(self.client_of(session), subscription[0], granted)
        ):
            super()._del_plain_subscription(subscription[0], session)
            return 0x80
        return granted

    def _del_plain_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_plain_subscription(a_filter, session)
        if deleted and self._cluster is not None:
            self._cluster.unsubscribed(self.client_of(session), a_filter)
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
        from_store = broadcast.get("stored", True)
        only = broadcast.get("filter")  # another node's message, for one local filter
        if only is not None:
            candidates = [(only, self.subscriptions.get(only, []))]
        else:
            candidates = list(self.subscriptions.items())
        for topic_filter, subscriptions in candidates:
            if not topic_matches(topic, topic_filter):
                continue
            for target, sub_qos in list(subscriptions):
                if from_store and cluster.served_from_store(not target.clean_session, sub_qos):
                    continue
                if not self.acl.check(target.client_id, topic, Action.RECEIVE):
                    continue
                if target.transitions.state != "connected":
                    continue
                handler = self._handler_of(target)
                if handler is not None:
                    qos = broadcast.get("qos", sub_qos)
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )
