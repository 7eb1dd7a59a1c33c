"""The loop-lag watch sees a callback that holds the loop, and nothing while it is idle."""

from __future__ import annotations

import asyncio
import time

from broker.loop_lag import watch_loop_lag


def test_a_callback_holding_the_loop_is_observed_as_lag() -> None:
    lags: list[float] = []

    async def main() -> None:
        watch = asyncio.create_task(watch_loop_lag(lags.append, tick_s=0.005))
        await asyncio.sleep(0.05)
        quiet = list(lags)
        await asyncio.sleep(0.01)
        time.sleep(0.06)  # a piece of work holding the loop for 60 ms
        await asyncio.sleep(0.02)
        watch.cancel()
        assert quiet and max(quiet) < 0.04  # idle: ticks on time (a loaded machine: late)
        assert max(lags) >= 0.05  # the held loop: one tick about 60 ms late

    asyncio.run(main())
