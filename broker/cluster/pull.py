"""A durable pull consumer's messages, pulled ahead into a callback.

nats-py's ``fetch`` hands each message over through ``next_msg``: a uuid, a task and an
``asyncio.wait_for`` (another task and a timer) per message, most of a busy node's cost of
delivering a stored message. Here one subscription on a private inbox receives what the pull
requests ask for, and each message goes to ``on_message`` from nats-py's own dispatch (no
task of ours). Requests are sent ahead while there is room in the window, so the next
batch is on its way while the last one is delivered.

Bookkeeping follows JetStream's pull protocol: a request for N messages stays at the server
until N have been sent or it expires; an expired request is answered ``408`` with
``Nats-Pending-Messages`` (what it did not deliver), ``409 Consumer Deleted`` ends the
consumer. Any other status leaves the count unknown, so nothing more is asked for until
every request sent has expired.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["ConsumerPull"]

_STATUS = "Status"
_PENDING = "Nats-Pending-Messages"
_DESCRIPTION = "Description"


class ConsumerPull:
    """Pull requests for one durable consumer on one NATS connection.

    ``outstanding`` is what the requests sent still may bring. Call :meth:`request` when
    there is room, :meth:`close` at the end.
    """

    def __init__(
        self,
        client: NatsClient,
        stream: str,
        consumer: str,
        on_message: Callable[[Msg], None],
        on_change: Callable[[], None],
        *,
        expires_s: float,
    ) -> None:
        self.client = client
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._on_message = on_message
        self._on_change = on_change
        self._expires_ns = int(expires_s * 1e9)
        self.expires_s = expires_s
        self.outstanding = 0
        self.deleted = False
        self._unknown_until = 0.0
        self._last_request = 0.0
        self._inbox = client.new_inbox()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self.client.subscribe(self._inbox, cb=self._received)

    async def request(self, count: int) -> None:
        """Ask for up to ``count`` more messages (none while the count is unknown)."""
        now = time.monotonic()
        if self._unknown_until:
            if now < self._unknown_until:
                return
            # Every request sent before the unknown answer has expired: none is left.
            self.outstanding, self._unknown_until = 0, 0.0
        if count <= 0 or self.deleted:
            return
        body = json.dumps({"batch": count, "expires": self._expires_ns}).encode()
        await self.client.publish(self._subject, body, reply=self._inbox)
        self.outstanding += count
        self._last_request = now

    def expired(self) -> None:
        """Nothing came for longer than a request lives: every request sent has expired
        (their 408s lost with a connection, say)."""
        if time.monotonic() - self._last_request > self.expires_s:
            self.outstanding, self._unknown_until = 0, 0.0

    @property
    def held(self) -> bool:
        """Whether requests wait for the earlier ones to expire (an answer without a count)."""
        return self._unknown_until > time.monotonic()

    @property
    def settled(self) -> bool:
        """Whether no request sent may still bring a message."""
        return self.outstanding == 0 or time.monotonic() - self._last_request > self.expires_s

    async def close(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.unsubscribe()

    async def _received(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if not status:
            if self.outstanding > 0:
                self.outstanding -= 1
            self._on_message(msg)
            return
        assert headers is not None
        if status == "100":  # an idle heartbeat or flow control: not asked for
            return
        if status == "408" and _PENDING in headers:
            self.outstanding = max(self.outstanding - int(headers[_PENDING]), 0)
        elif status == "409" and "deleted" in str(headers.get(_DESCRIPTION, "")).lower():
            self.deleted = True
            self.outstanding = 0
        else:
            # 404/408 without a count, other 409s: the count is unknown until every
            # request sent so far has expired.
            self._unknown_until = self._last_request + self.expires_s
        self._on_change()
