"""QoS 1 messages into JetStream, many in flight at once, each PUBACK released by its ack.

A request/reply per message (``js.publish``) costs a task, a timer and a round trip before
the next can go; at thousands of messages a second that was most of a node's CPU
(BENCHMARKS.md, round 3). Here each message is sent with nats-py's ``publish_async`` (one
reply subscription for all of them) and its ``done`` future is resolved from the ack's
callback: no task per message.

Nothing acknowledged is lost, and nothing is acknowledged falsely:

- ``done`` (the client's PUBACK) is resolved only by a positive JetStream ack;
- an error ack, no ack within :data:`ACK_TIMEOUT_S`, or no connection: the message is sent
  again, with backoff, under the *same* ``Nats-Msg-Id``, so JetStream stores it once even
  when only the ack was lost (the stream's duplicate window is two minutes);
- after a reconnect every unacknowledged message is sent again at once;
- a message whose client went away (its ``done`` was cancelled) is given up: the client
  sends it again on its next connection (MQTT's DUP), possibly stored twice (QoS 1 is
  at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from broker.cluster.link import ClusterLink, NotConnectedError

__all__ = ["ACK_TIMEOUT_S", "MSG_ID_HEADER", "StorePipeline"]

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
#: A store not acknowledged in this long is sent again (same message id).
ACK_TIMEOUT_S = 2.0
_SWEEP_S = 0.1
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 2.0
_ERRORS = (nats.errors.Error, OSError, TimeoutError, NotConnectedError)


@dataclass(slots=True)
class _Pending:
    subject: str
    data: bytes
    headers: dict[str, str]
    done: asyncio.Future[bool] | None
    ack: asyncio.Future[Any] | None = None
    sent_at: float = 0.0
    retry_at: float = 0.0
    attempts: int = 0


class StorePipeline:
    """Stores messages in JetStream (the stream that captures their subjects) and tells
    each one's ``done`` when it is stored."""

    def __init__(
        self,
        link: ClusterLink,
        *,
        on_stored: Callable[[], None] = lambda: None,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self._on_stored = on_stored
        self._on_retry = on_retry
        self._id_stem = f"{link.options.node}-{secrets.token_hex(4)}-"
        self._next = 0
        self._pending: dict[int, _Pending] = {}
        self._sweeper: asyncio.Task[None] | None = None
        link.add_setup(self._resend_all)

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged by JetStream."""
        return len(self._pending)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="store-sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def store(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        done: asyncio.Future[bool] | None,
    ) -> None:
        """Store ``data`` on ``subject``; ``done`` is resolved once JetStream has it."""
        number = self._next
        self._next += 1
        headers = {**headers, MSG_ID_HEADER: f"{self._id_stem}{number}"}
        entry = _Pending(subject, data, headers, done)
        self._pending[number] = entry
        await self._send(number, entry)

    async def _send(self, number: int, entry: _Pending) -> None:
        entry.attempts += 1
        try:
            js = self.link.js
            # No expected-stream header: the stream is the only one on these subjects, and
            # each header is encoded here and parsed on every node that receives it.
            ack = await js.publish_async(entry.subject, entry.data, headers=entry.headers)
        except _ERRORS:
            self._later(entry)
            return
        entry.ack = ack
        entry.sent_at = time.monotonic()
        ack.add_done_callback(functools.partial(self._acked, number, ack))

    def _later(self, entry: _Pending) -> None:
        entry.ack = None
        backoff = min(_FIRST_BACKOFF_S * 2 ** max(entry.attempts - 1, 0), _MAX_BACKOFF_S)
        entry.retry_at = time.monotonic() + backoff
        self._on_retry()

    def _acked(self, number: int, ack: asyncio.Future[Any], _: object) -> None:
        entry = self._pending.get(number)
        if entry is None or entry.ack is not ack:
            return  # an earlier attempt's answer; a later one is on its way
        if ack.cancelled() or ack.exception() is not None:
            if not ack.cancelled():
                log.debug("store refused by JetStream error=%r", ack.exception())
            self._later(entry)
            return
        del self._pending[number]
        if entry.done is not None and not entry.done.done():
            entry.done.set_result(True)
        self._on_stored()

    async def _resend_all(self, _client: NatsClient, _js: JetStreamContext) -> None:
        """On a new connection: what the old one left unacknowledged goes again now."""
        for entry in self._pending.values():
            if entry.ack is not None:
                old, entry.ack = entry.ack, None
                old.cancel()
            entry.retry_at = 0.0

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            if not self._pending:
                continue
            now = time.monotonic()
            for number, entry in list(self._pending.items()):
                if entry.done is not None and entry.done.done():
                    # The client left before the store was acknowledged: it will re-send.
                    self._pending.pop(number, None)
                    if entry.ack is not None:
                        entry.ack.cancel()
                    continue
                if entry.ack is None:
                    if now >= entry.retry_at and self.link.connected:
                        with contextlib.suppress(*_ERRORS):
                            await self._send(number, entry)
                elif now - entry.sent_at > ACK_TIMEOUT_S:
                    entry.ack.cancel()  # _acked schedules it again (same message id)
