"""One worker: a set of devices on one asyncio loop, reporting counters to whoever runs it.

A worker is a process (``worker_main``, spawned by :class:`device_sim.runner.SimRun`) or, with
``workers=0``, a thread of the calling process; either way it reports cumulative
:class:`~device_sim.stats.WorkerStats` every ``report_interval`` seconds and once more, with
``done=True``, at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from device_sim.bundle import DeviceBundle
from device_sim.device import DeviceConfig, DeviceEvent, SimDevice
from device_sim.stats import WorkerStats
from fleetcore.config import log_level

__all__ = ["WorkerPlan", "WorkerReport", "raise_open_file_limit", "run_worker", "worker_main"]

log = logging.getLogger(__name__)

LAG_PROBE_INTERVAL = 0.05


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker runs."""

    worker_id: int
    bundles: list[DeviceBundle]
    config: DeviceConfig
    duration: float
    connect_concurrency: int = 64
    report_interval: float = 0.5
    events: bool = False
    seed: int | None = None
    uvloop: bool = True
    log_level: str = "warning"


@dataclass
class WorkerReport:
    worker_id: int
    stats: WorkerStats
    events: list[DeviceEvent] = field(default_factory=list)
    done: bool = False
    error: str | None = None


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft open-file limit toward ``wanted`` (one socket per device)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run_worker(
    plan: WorkerPlan, report: Callable[[WorkerReport], None], stop_flag: StopFlag | None = None
) -> WorkerStats:
    """Run the plan's devices to the end of the run (or until ``stop_flag`` is set)."""
    raise_open_file_limit(len(plan.bundles) + 256)
    loop = asyncio.get_running_loop()
    cpu_started = time.process_time()
    stats = WorkerStats(devices=len(plan.bundles))
    pending_events: list[DeviceEvent] = []
    stop = asyncio.Event()
    rng = random.Random(plan.seed)
    slots = asyncio.Semaphore(plan.connect_concurrency)
    devices = [
        SimDevice(
            bundle,
            plan.config,
            stats,
            connect_slots=slots,
            events=pending_events.append if plan.events else None,
            rng=random.Random(rng.random()),
        )
        for bundle in plan.bundles
    ]
    stop_at = loop.time() + plan.duration

    def send(done: bool) -> None:
        stats.cpu_seconds = time.process_time() - cpu_started
        events = pending_events[:]
        pending_events.clear()
        report(WorkerReport(plan.worker_id, copy.deepcopy(stats), events, done=done))

    async def housekeeping() -> None:
        next_misc = loop.time()
        while True:
            await asyncio.sleep(plan.report_interval)
            if stop_flag is not None and stop_flag.is_set():
                stop.set()
            if loop.time() >= next_misc:
                next_misc = loop.time() + 1.0
                for device in devices:
                    device.misc()
            send(done=False)

    async def lag_probe() -> None:
        """How late a 50 ms timer fires: what a blocking call would cost every device."""
        while True:
            expected = loop.time() + LAG_PROBE_INTERVAL
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            stats.loop_lag.record(max(0.0, loop.time() - expected))

    helpers = [asyncio.ensure_future(housekeeping()), asyncio.ensure_future(lag_probe())]
    try:
        await asyncio.gather(*(device.run(stop_at=stop_at, stop=stop) for device in devices))
    finally:
        for helper in helpers:
            helper.cancel()
        for helper in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await helper
    send(done=True)
    return stats


def worker_main(plan: WorkerPlan, queue: Any, stop_flag: StopFlag) -> None:
    """Process entry point: run the worker, report through ``queue`` (multiprocessing).

    Ctrl-C on the terminal reaches every process of the group: the worker ignores it and
    stops when the parent sets ``stop_flag``, so its devices drain and it still reports.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler()
    formatter = logging.Formatter(
        "ts=%(asctime)s.%(msecs)03dZ level=%(levelname)s logger=%(name)s "
        f"worker={plan.worker_id} %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(log_level(plan.log_level))
    runner: Callable[..., Any] = asyncio.run
    if plan.uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    try:
        runner(run_worker(plan, queue.put, stop_flag))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        log.exception("simulator worker failed worker_id=%s", plan.worker_id)
        queue.put(
            WorkerReport(
                plan.worker_id, WorkerStats(), done=True, error=f"{type(exc).__name__}: {exc}"
            )
        )
