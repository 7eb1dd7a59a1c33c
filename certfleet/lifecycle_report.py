"""What `certfleet sim lifecycle` shows: the JSON object, a rich table, live progress, and a
PNG of the renewal rate over time for every stagger value side by side."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from certfleet.lifecycle_run import LifecyclePlan, StaggerRun
from certfleet.lifecycle_stats import BUCKET_S

__all__ = ["LiveProgress", "lifecycle_json", "render_table", "write_png"]


def lifecycle_json(runs: Sequence[StaggerRun], png: Path | None) -> dict[str, Any]:
    """The ``--json`` object: ``{"runs": [...], "png": FILE}``."""
    return {"runs": [run.as_dict() for run in runs], "png": str(png) if png else None}


def render_table(plan: LifecyclePlan, runs: Sequence[StaggerRun], console: Console) -> None:
    table = Table(
        title=(
            f"renewal storm: {plan.devices} devices, lifetime {plan.lifetime_s} s, "
            f"{plan.duration_s:g} s, rates over {BUCKET_S:g} s buckets"
        )
    )
    for heading in (
        "stagger s",
        "renewals",
        "peak /s",
        "p99 /s",
        "latency p50 ms",
        "latency p99 ms",
        "refused",
        "retried",
        "expired",
        "superseded revoked",
    ):
        table.add_column(heading, justify="right")
    for run in runs:
        row = run.as_dict()
        expired = row["expired_before_renewal"]
        table.add_row(
            *("-" if row[key] is None else str(row[key]) for key in list(row)[:8]),
            f"[red]{expired}[/red]" if expired else "0",
            str(row["superseded_revoked"]),
        )
    console.print(table)
    if len(runs) >= 2 and runs[0].figures.peak_renewals_per_s > 0:
        first, last = runs[0], runs[-1]
        ratio = last.figures.peak_renewals_per_s / first.figures.peak_renewals_per_s
        console.print(
            f"peak with stagger {last.stagger_s} s is {ratio:.0%} of the peak with stagger "
            f"{first.stagger_s} s"
        )


def write_png(plan: LifecyclePlan, runs: Sequence[StaggerRun], path: Path) -> Path:
    """Renewals per second over the fleet's life, one panel per stagger value, same axes."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache chatter
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(runs), figsize=(5.5 * len(runs), 4), sharey=True, squeeze=False
    )
    for axis, run in zip(axes[0], runs, strict=True):
        starts = [index * BUCKET_S for index in range(len(run.figures.rates))]
        axis.bar(starts, run.figures.rates, width=BUCKET_S, align="edge", color="tab:blue")
        axis.axhline(run.figures.peak_renewals_per_s, color="tab:red", linewidth=0.8)
        axis.set_title(
            f"stagger {run.stagger_s} s: peak {run.figures.peak_renewals_per_s:g}/s, "
            f"{run.figures.renewals} renewals"
        )
        axis.set_xlabel("seconds into the fleet's life")
        axis.set_xlim(0, plan.duration_s)
        axis.set_ylim(bottom=0)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"renewals per second ({BUCKET_S:g} s buckets)")
    figure.suptitle(
        f"{plan.devices} devices, certificate lifetime {plan.lifetime_s} s", fontsize=11
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class LiveProgress:
    """One progress bar per stagger value (seconds of the fleet's life run so far)."""

    def __init__(self, plan: LifecyclePlan, console: Console) -> None:
        self._plan = plan
        self._progress = RichProgress(
            TextColumn("stagger {task.fields[stagger]:>5} s"),
            BarColumn(),
            TextColumn("{task.completed:>5.0f}/{task.total:.0f} s"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[int, TaskID] = {}

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def __call__(
        self, stagger_s: int, phase: str, elapsed: float, renewals: int, connected: int
    ) -> None:
        task = self._tasks.get(stagger_s)
        if task is None:
            task = self._progress.add_task(phase, total=self._plan.duration_s, stagger=stagger_s)
            self._tasks[stagger_s] = task
        detail = phase if phase != "running" else f"{connected} connected, {renewals} renewals"
        self._progress.update(
            task, completed=min(elapsed, self._plan.duration_s), description=detail
        )
