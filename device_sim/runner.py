"""A simulation run: devices spread over worker processes, their reports merged here.

    with SimRun(bundles, config, duration=30, workers=4, renewal_log=Path("r.jsonl")) as run:
        while not run.finished:
            print(run.snapshot().acked)
            run.wait(0.5)
    summary = run.summary()

Workers are spawned processes (``workers >= 1``) or one thread of this process
(``workers = 0``, used by tests and small runs). Each reports cumulative counters; the run
keeps the latest report of each and merges them on demand. Renewal events
(:mod:`device_sim.renewal_events`) arrive with the reports: ``on_renewal`` is called for each,
``renewal_events()`` returns them all, and ``renewal_log`` appends them as JSON lines.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from device_sim.bundle import DeviceBundle
from device_sim.device import DeviceConfig, DeviceEvent
from device_sim.errors import SimError
from device_sim.renewal_events import RenewalEvent
from device_sim.stats import WorkerStats
from device_sim.worker import WorkerPlan, WorkerReport, run_worker, worker_main

__all__ = ["DEVICES_PER_WORKER", "SimRun", "default_workers"]

log = logging.getLogger(__name__)

#: Devices one worker process is sized for (the single-process benchmark target).
DEVICES_PER_WORKER = 2500


def default_workers(devices: int) -> int:
    return max(1, math.ceil(devices / DEVICES_PER_WORKER))


class SimRun:
    """Start, watch and stop a simulation; a context manager that always ends its workers."""

    def __init__(
        self,
        bundles: list[DeviceBundle],
        config: DeviceConfig,
        *,
        duration: float,
        workers: int | None = None,
        connect_concurrency: int = 64,
        on_event: Callable[[DeviceEvent], None] | None = None,
        seed: int | None = None,
        uvloop: bool = True,
        log_level: str = "warning",
        on_renewal: Callable[[RenewalEvent], None] | None = None,
        renewal_log: Path | None = None,
    ) -> None:
        if not bundles:
            raise SimError("a simulation needs at least one device bundle")
        self.config = config
        self.duration = duration
        self.worker_count = default_workers(len(bundles)) if workers is None else workers
        self._on_event = on_event
        self._on_renewal = on_renewal
        self._renewal_log_path = renewal_log
        self._renewal_log: IO[str] | None = None
        self._renewal_events: list[RenewalEvent] = []
        self._reports: dict[int, WorkerReport] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._errors: list[str] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0
        self._ended_at: float | None = None
        slices = max(1, self.worker_count)
        self._plans = [
            WorkerPlan(
                worker_id=index,
                bundles=bundles[index::slices],
                config=config,
                duration=duration,
                connect_concurrency=connect_concurrency,
                events=on_event is not None,
                seed=None if seed is None else seed + index,
                uvloop=uvloop,
                log_level=log_level,
                first_index=index,
                index_stride=slices,
            )
            for index in range(slices)
            if bundles[index::slices]
        ]
        self._stop: Any = None
        self._queue: Any = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SimRun:
        self._started_at = time.monotonic()
        if self._renewal_log_path is not None:
            try:
                self._renewal_log = self._renewal_log_path.open("a", encoding="utf-8")
            except OSError as exc:
                raise SimError(
                    f"cannot write renewal events to {self._renewal_log_path}: {exc}"
                ) from None
        if self.worker_count == 0:
            self._queue = queue.Queue()
            self._stop = threading.Event()
            for plan in self._plans:
                thread = threading.Thread(
                    target=self._thread_worker, args=(plan,), name="sim-worker", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        else:
            context = multiprocessing.get_context("spawn")
            self._queue = context.Queue()
            self._stop = context.Event()
            for plan in self._plans:
                process = context.Process(
                    target=worker_main,
                    args=(plan, self._queue, self._stop),
                    name=f"sim-worker-{plan.worker_id}",
                    daemon=True,
                )
                process.start()
                self._processes.append(process)
        collector = threading.Thread(target=self._collect, name="sim-collector", daemon=True)
        collector.start()
        self._collector = collector
        return self

    def _thread_worker(self, plan: WorkerPlan) -> None:
        import asyncio

        try:
            asyncio.run(run_worker(plan, self._queue.put, self._stop))
        except Exception as exc:
            log.exception("simulator worker failed worker_id=%s", plan.worker_id)
            self._queue.put(WorkerReport(plan.worker_id, WorkerStats(), done=True, error=repr(exc)))

    def _collect(self) -> None:
        finished: set[int] = set()
        expected = {plan.worker_id for plan in self._plans}
        while finished != expected:
            try:
                report: WorkerReport = self._queue.get(timeout=0.25)
            except queue.Empty:
                # Nothing in the queue: a worker process that has exited by now without its
                # final report never will send it (crashed, killed, out of memory).
                dead = self._dead_without_report(finished)
                if finished | dead == expected:
                    break
                continue
            with self._lock:
                self._reports[report.worker_id] = report
            if self._on_event is not None:
                for event in report.events:
                    self._on_event(event)
            if report.renewals:
                self._record_renewals(report.renewals)
            if report.error:
                self._errors.append(f"worker {report.worker_id}: {report.error}")
            if report.done:
                finished.add(report.worker_id)
        self._ended_at = time.monotonic()
        if self._renewal_log is not None:
            self._renewal_log.close()
        self._done.set()

    def _record_renewals(self, events: list[RenewalEvent]) -> None:
        with self._lock:
            self._renewal_events.extend(events)
        if self._renewal_log is not None:
            self._renewal_log.writelines(event.json_line() for event in events)
            self._renewal_log.flush()
        if self._on_renewal is not None:
            for event in events:
                self._on_renewal(event)

    def _dead_without_report(self, finished: set[int]) -> set[int]:
        dead: set[int] = set()
        for plan, process in zip(self._plans, self._processes, strict=False):
            if plan.worker_id in finished or process.is_alive():
                continue
            dead.add(plan.worker_id)
            message = (
                f"worker {plan.worker_id} exited with code {process.exitcode} without its "
                "final report"
            )
            if message not in self._errors:
                log.error(
                    "simulator worker died worker_id=%s exitcode=%s",
                    plan.worker_id,
                    process.exitcode,
                )
                self._errors.append(message)
        return dead

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (empty when workers run as threads)."""
        return [process.pid for process in self._processes if process.pid is not None]

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every worker has finished; True when they have."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        """Ask every device to finish now (drain, disconnect)."""
        if self._stop is not None:
            self._stop.set()

    def close(self, timeout: float = 15.0) -> None:
        """Stop, wait (bounded) and make sure no worker process outlives the run."""
        self.stop()
        self.wait(timeout)
        for process in self._processes:
            process.join(timeout=max(0.0, timeout / 3))
            if process.is_alive():
                log.warning("killing simulator worker pid=%s", process.pid)
                process.kill()
                process.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=max(0.0, timeout / 3))

    def __enter__(self) -> SimRun:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- results --------------------------------------------------------------------------

    @property
    def errors(self) -> list[str]:
        return list(self._errors)

    @property
    def elapsed(self) -> float:
        end = self._ended_at if self._ended_at is not None else time.monotonic()
        return max(0.0, end - self._started_at)

    def renewal_events(self) -> list[RenewalEvent]:
        """Every renewal event received so far, in arrival order."""
        with self._lock:
            return list(self._renewal_events)

    def snapshot(self) -> WorkerStats:
        """The merged latest counters of every worker."""
        merged = WorkerStats()
        with self._lock:
            for report in self._reports.values():
                merged.merge(report.stats)
        return merged

    def summary(self) -> dict[str, Any]:
        """The JSON summary: settings, counters, latencies and failures by reason."""
        stats = self.snapshot()
        elapsed = self.elapsed
        return {
            "devices": sum(len(plan.bundles) for plan in self._plans),
            "workers": self.worker_count,
            "duration_s": self.duration,
            "elapsed_s": round(elapsed, 2),
            "rate_per_device": self.config.rate,
            "qos": self.config.qos,
            "broker": ",".join(str(address) for address in self.config.brokers),
            **stats.as_dict(),
            "messages_acknowledged_per_s": round(stats.acked / elapsed, 1) if elapsed else 0.0,
            "cpu_cores_used": round(stats.cpu_seconds / elapsed, 3) if elapsed else 0.0,
            "errors": self.errors,
        }
