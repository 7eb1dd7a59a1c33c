"""amqtt's Broker with two hot spots of its per-message path taken off the slow road.

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

Both override private methods of amqtt 0.12 (pinned ``<0.13`` in pyproject.toml); the
broker tests exercise both paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from amqtt.broker import _BROADCAST_SHUTDOWN_TIMEOUT, Broker
from amqtt.contexts import Action
from amqtt.session import Session

from broker.acl import DeviceTopicPlugin

__all__ = ["CertfleetBroker"]

log = logging.getLogger(__name__)


class CertfleetBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """The amqtt broker certfleet runs."""

    _acl: DeviceTopicPlugin | None = None

    def use_topic_plugin(self, plugin: DeviceTopicPlugin) -> None:
        self._acl = plugin

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
                    await self._run_broadcast(running)  # takes the next item without waiting
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
