"""Supervised background tasks: none of the broker's may die silently.

:meth:`Supervisor.start` runs a coroutine factory as a task; when the coroutine raises (or
returns, which a background loop never should) the failure is logged as one line, counted
(``certfleet_broker_task_restarts_total{task}``) and the coroutine is started again after a
backoff that grows while it keeps failing. :attr:`Supervisor.failing` tells health checks
which tasks are between a failure and their next healthy run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

#: A task that ran this long before failing starts again from the shortest backoff.
_HEALTHY_RUN_S = 60.0


class Supervisor:
    """Start, watch and restart named background coroutines on the running loop."""

    def __init__(
        self,
        on_restart: Callable[[str], None] = lambda _name: None,
        *,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._on_restart = on_restart
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Task name -> last error, while the task waits to be restarted.
        self.failing: dict[str, str] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``run()`` as the supervised task ``name``."""
        task = asyncio.get_running_loop().create_task(self._keep(name, run), name=name)
        self._tasks[name] = task
        return task

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        backoff = self.min_backoff_s
        while True:
            started = time.monotonic()
            try:
                await run()
                error = "returned"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point: nothing ends a task silently
                error = f"{type(exc).__name__}: {exc}"[:300]
            if time.monotonic() - started >= _HEALTHY_RUN_S:
                backoff = self.min_backoff_s
            self.failing[name] = error
            self._on_restart(name)
            log.error("task failed task=%s error=%s restart_in_s=%.1f", name, error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            self.failing.pop(name, None)
            log.info("task restarted task=%s", name)

    async def stop(self) -> None:
        """Cancel every task and wait for them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
