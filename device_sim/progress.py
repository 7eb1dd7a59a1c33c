"""Live progress on the terminal (rich): connected devices, messages per second, errors."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table

from device_sim.runner import SimRun
from device_sim.stats import WorkerStats

__all__ = ["watch"]


def _table(run: SimRun, stats: WorkerStats, per_second: float) -> Table:
    table = Table(title="certfleet simulator", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("elapsed", f"{run.elapsed:6.1f} s of {run.duration:g} s")
    table.add_row("connected", f"{stats.connected} / {stats.devices} devices")
    table.add_row("messages/s", f"{per_second:,.0f} acknowledged")
    table.add_row("sent / acked", f"{stats.sent:,} / {stats.acked:,}")
    failures = stats.failures + stats.disconnects
    errors = ", ".join(f"{reason}={count}" for reason, count in failures.most_common(6))
    table.add_row("errors", errors or "none")
    if stats.stopped:
        stopped = ", ".join(f"{r}={c}" for r, c in stats.permanent.most_common(4))
        table.add_row("stopped", f"{stats.stopped} ({stopped})")
    return table


def watch(run: SimRun, console: Console, refresh: float = 0.5) -> None:
    """Redraw the progress table until the run has finished."""
    last_acked, last_time = 0, run.elapsed
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while not run.wait(refresh):
            stats = run.snapshot()
            now = run.elapsed
            per_second = (stats.acked - last_acked) / max(now - last_time, 1e-6)
            last_acked, last_time = stats.acked, now
            live.update(_table(run, stats, per_second), refresh=True)
        stats = run.snapshot()
        live.update(_table(run, stats, stats.acked / max(run.elapsed, 1e-6)), refresh=True)
