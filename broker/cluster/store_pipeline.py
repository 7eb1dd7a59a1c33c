"""QoS 1 messages into JetStream, many in flight at once, each PUBACK released by its ack.

A request/reply per message (``js.publish``) costs a task, a timer and a round trip before
the next can go; at thousands of messages a second that was most of a node's CPU
(BENCHMARKS.md, round 3). Here each message is published with a reply subject under one
inbox of ours (``<inbox>.<number>.<attempt>``), and the ack that comes back there resolves its
``done`` directly: no task, future or random token per message (nats-py's ``publish_async``
costs all three, and parses every ack into a dataclass).

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
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
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
    in_flight: bool = False
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
        self._acks_on: NatsClient | None = None
        self._reply_prefix = ""
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
            client = self.link.client
            if self._acks_on is not client:
                await self._listen(client)
            # In flight before the publish: its ack must find it so, however soon it comes.
            entry.in_flight = True
            entry.sent_at = time.monotonic()
            # No expected-stream header: the stream is the only one on these subjects, and
            # each header is encoded here and parsed on every node that receives it.
            await client.publish(
                entry.subject,
                entry.data,
                reply=f"{self._reply_prefix}{number}.{entry.attempts}",
                headers=entry.headers,
            )
        except _ERRORS:
            self._later(entry)

    async def _listen(self, client: NatsClient) -> None:
        """The acks' inbox on ``client`` (one subscription for every store)."""
        inbox = client.new_inbox()
        await client.subscribe(f"{inbox}.*.*", cb=self._on_ack)
        self._acks_on, self._reply_prefix = client, f"{inbox}."

    def _later(self, entry: _Pending) -> None:
        entry.in_flight = False
        backoff = min(_FIRST_BACKOFF_S * 2 ** max(entry.attempts - 1, 0), _MAX_BACKOFF_S)
        entry.retry_at = time.monotonic() + backoff
        self._on_retry()

    async def _on_ack(self, msg: Msg) -> None:
        number_s, _, attempt_s = msg.subject[len(self._reply_prefix) :].partition(".")
        try:
            number, attempt = int(number_s), int(attempt_s)
        except ValueError:
            return
        entry = self._pending.get(number)
        if entry is None or not entry.in_flight or entry.attempts != attempt:
            return  # an earlier attempt's answer; a later one is on its way
        refusal = _refusal(msg)
        if refusal is not None:
            log.debug("store refused by JetStream error=%s", refusal)
            self._later(entry)
            return
        del self._pending[number]
        if entry.done is not None and not entry.done.done():
            entry.done.set_result(True)
        self._on_stored()

    async def _resend_all(self, _client: NatsClient, _js: JetStreamContext) -> None:
        """On a new connection: what the old one left unacknowledged goes again now."""
        for entry in self._pending.values():
            entry.in_flight = False
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
                    continue
                if not entry.in_flight:
                    if now >= entry.retry_at and self.link.connected:
                        with contextlib.suppress(*_ERRORS):
                            await self._send(number, entry)
                elif now - entry.sent_at > ACK_TIMEOUT_S:
                    self._later(entry)  # sent again (same message id)


def _refusal(msg: Msg) -> str | None:
    """None when ``msg`` is JetStream's positive ack (``{"stream": ..., "seq": ...}``), else
    why not: a status (503: no stream took it) or the ack's error."""
    if msg.headers and msg.headers.get("Status"):
        return f"status {msg.headers.get('Status')}"
    if b'"error"' not in msg.data and b'"seq"' in msg.data:
        return None
    try:
        return str(json.loads(msg.data).get("error", "no sequence in the ack"))[:200]
    except (ValueError, AttributeError):
        return "unreadable ack"
