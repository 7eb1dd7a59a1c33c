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

from amqtt.broker import _BROADCAST_SHUTDOWN_TIMEOUT, Broker
from amqtt.contexts import Action
from amqtt.session import Session

from broker.acl import DeviceTopicPlugin
from factory.topics import is_renewal_topic

__all__ = ["CertfleetBroker"]

log = logging.getLogger(__name__)


class CertfleetBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """The amqtt broker certfleet runs."""

    _acl: DeviceTopicPlugin | None = None
    _on_route_error: Callable[[BaseException], None] = staticmethod(lambda _exc: None)

    def use_topic_plugin(self, plugin: DeviceTopicPlugin) -> None:
        self._acl = plugin

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

    _forward: Callable[[str, bytes, int | None], Awaitable[object]] | None = None

    def forward_with(self, forward: Callable[[str, bytes, int | None], Awaitable[object]]) -> None:
        """Hand every message a local client published (after its ACL) to ``forward`` too:
        the cluster router's way to the other nodes (:mod:`broker.cluster.router`)."""
        self._forward = forward

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        await super()._broadcast_message(session, topic, data, force_qos)
        if self._forward is not None and session is not None and topic and data is not None:
            await self._forward(topic, bytes(data), force_qos)

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
