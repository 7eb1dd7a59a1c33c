"""ConsumerPull against a real nats-server: what is asked for arrives, the count of what may
still come follows JetStream's 408s, and a deleted consumer ends it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy

from broker.cluster.natsd import LocalNats
from broker.cluster.pull import ConsumerPull
from tests.support.nats import admin_connect
from tests.support.waits import until

# `alone`: pull requests expiring after 0.2-0.3 s, checked with sub-second margins (time bounds).
pytestmark = pytest.mark.alone

STREAM = "PULLTEST"


def _with_stream(
    server: LocalNats, body: Callable[[nats.NATS, JetStreamContext], Awaitable[None]]
) -> None:
    """Run ``body`` on a connection to ``server`` with the test stream made."""

    async def run() -> None:
        client = await admin_connect(server)
        try:
            js = client.jetstream()
            await js.add_stream(name=STREAM, subjects=["pt.>"])
            await body(client, js)
        finally:
            await client.close()

    asyncio.run(run())


def _ignore(_message: Msg) -> None:
    """A message callback that keeps nothing."""


def _nothing() -> None:
    """A change callback that does nothing."""


def test_requests_bring_what_is_stored_and_expire_to_a_count_of_zero(
    nats_server: LocalNats,
) -> None:
    async def body(client: nats.NATS, js: JetStreamContext) -> None:
        await js.add_consumer(
            STREAM, durable_name="c1", filter_subject="pt.>", ack_policy=AckPolicy.EXPLICIT
        )
        for n in range(3):
            await js.publish("pt.a", str(n).encode())
        got: list[Msg] = []
        changes: list[int] = []
        pull = ConsumerPull(
            client, STREAM, "c1", got.append, lambda: changes.append(1), expires_s=0.4
        )
        await pull.start()
        await pull.request(10)
        assert pull.outstanding == 10
        assert await until(lambda: len(got) == 3)
        assert [m.data for m in got] == [b"0", b"1", b"2"]
        assert pull.outstanding == 7  # the request still waits at the server
        await js.publish("pt.b", b"3")  # ...and takes what comes next
        assert await until(lambda: len(got) == 4)
        assert pull.outstanding == 6
        # It expires: the 408 says 6 were not delivered.
        assert await until(lambda: pull.outstanding == 0 and changes)
        assert pull.settled
        for message in got:
            await message.ack()
        # A deleted consumer ends the pull.
        await pull.request(5)
        await js.delete_consumer(STREAM, "c1")
        assert await until(lambda: pull.deleted)
        await pull.close()

    _with_stream(nats_server, body)


def test_an_answer_without_a_count_holds_requests_until_every_request_has_expired(
    nats_server: LocalNats,
) -> None:
    async def body(client: nats.NATS, js: JetStreamContext) -> None:
        await js.add_consumer(
            STREAM,
            durable_name="c2",
            filter_subject="pt.>",
            ack_policy=AckPolicy.EXPLICIT,
            max_waiting=1,
        )
        pull = ConsumerPull(client, STREAM, "c2", _ignore, _nothing, expires_s=0.3)
        await pull.start()
        await pull.request(2)  # waits at the server: nothing is stored
        await pull.request(2)  # refused: 409 Exceeded MaxWaiting, no count
        assert await until(lambda: pull.held)
        await pull.request(1)
        assert pull.outstanding == 4  # not sent: what the refusal covered is unknown
        await asyncio.sleep(0.35)
        await pull.request(1)
        assert pull.outstanding == 1  # every earlier request has expired
        await pull.close()

    _with_stream(nats_server, body)


def test_silence_longer_than_a_request_lives_counts_as_expiry(nats_server: LocalNats) -> None:
    async def body(client: nats.NATS, js: JetStreamContext) -> None:
        # No such consumer: JetStream does not answer at all.
        pull = ConsumerPull(client, STREAM, "missing", _ignore, _nothing, expires_s=0.2)
        await pull.start()
        await pull.request(3)
        pull.expired()
        assert pull.outstanding == 3  # too early to tell
        await asyncio.sleep(0.25)
        pull.expired()
        assert pull.outstanding == 0 and pull.settled
        await pull.close()

    _with_stream(nats_server, body)
