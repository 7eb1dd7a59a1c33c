"""Supervised background tasks: a failure is logged, counted and followed by a restart."""

from __future__ import annotations

import asyncio
import logging

import pytest

from broker.supervisor import Supervisor


def test_a_failing_task_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    restarts: list[str] = []
    runs: list[int] = []
    seen_failing: list[dict[str, str]] = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise OSError("disk went away")
        await asyncio.sleep(3600)  # the third run is healthy

    async def main() -> None:
        supervisor = Supervisor(restarts.append, min_backoff_s=0.01, max_backoff_s=0.02)
        supervisor.start("flaky", flaky)
        for _ in range(500):
            if supervisor.failing:
                seen_failing.append(dict(supervisor.failing))
            if len(runs) >= 3:
                break
            await asyncio.sleep(0.005)
        assert not supervisor.failing  # running again
        await supervisor.stop()

    with caplog.at_level(logging.INFO, logger="broker.supervisor"):
        asyncio.run(main())
    assert len(runs) == 3
    assert restarts == ["flaky", "flaky"]
    assert any("OSError: disk went away" in f["flaky"] for f in seen_failing)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("task failed task=flaky error=OSError: disk went away" in m for m in lines) == 2
    assert sum("task restarted task=flaky" in m for m in lines) == 2


def test_a_task_that_returns_is_restarted_too() -> None:
    runs: list[int] = []

    async def returns() -> None:
        runs.append(1)

    async def main() -> None:
        supervisor = Supervisor(min_backoff_s=0.01, max_backoff_s=0.01)
        supervisor.start("quits", returns)
        for _ in range(500):
            if len(runs) >= 3:
                break
            await asyncio.sleep(0.005)
        await supervisor.stop()

    asyncio.run(main())
    assert len(runs) >= 3
