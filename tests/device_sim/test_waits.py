"""Bounded waits keep a cancellation that arrives together with what they wait for.

On Python 3.11, ``asyncio.wait_for`` returned the result instead (the renewer of a device
whose connection came up as the run ended went on waiting until its certificate expired,
and the run waited for it: issue 14's "expired before renewal" at the storm's end)."""

from __future__ import annotations

import asyncio

import pytest

from device_sim.waits import completes_within, set_within


async def _cancel_as_it_arrives(event: asyncio.Event, waiter: asyncio.Task[object]) -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the waiter is waiting on the event
    assert not waiter.done()
    event.set()
    waiter.cancel()  # in the same loop iteration as the event


def test_set_within_keeps_a_cancel_that_arrives_with_the_event() -> None:
    async def scenario() -> None:
        event = asyncio.Event()
        waiter = asyncio.ensure_future(set_within(event, 30))
        await _cancel_as_it_arrives(event, waiter)
        with pytest.raises(asyncio.CancelledError):
            await waiter

    for _ in range(20):
        asyncio.run(scenario())


def test_completes_within_keeps_a_cancel_that_arrives_with_the_result() -> None:
    async def scenario() -> None:
        event = asyncio.Event()
        waiter = asyncio.ensure_future(completes_within(event.wait(), 30))
        await _cancel_as_it_arrives(event, waiter)
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(scenario())


def test_set_within_answers_in_time_and_after_the_bound() -> None:
    asyncio.run(_answers())


async def _answers() -> None:
    event = asyncio.Event()
    assert await set_within(event, 0.05) is False
    event.set()
    assert await set_within(event, 0) is True
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    assert await completes_within(done, 1) is True
    assert await completes_within(asyncio.Event().wait(), 0.05) is False
