"""The expiry report: how many certificates of the manifest expire in each ISO week."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from factory.manifest import ManifestRecord

__all__ = ["WeekCount", "expiries_per_week", "render_png"]


@dataclass(frozen=True, slots=True)
class WeekCount:
    """Certificates expiring in the ISO week starting (Monday, UTC) on ``week_start``."""

    week_start: dt.date
    count: int

    @property
    def iso_week(self) -> str:
        year, week, _ = self.week_start.isocalendar()
        return f"{year}-W{week:02d}"

    def as_dict(self) -> dict[str, str | int]:
        return {
            "week_start": self.week_start.isoformat(),
            "iso_week": self.iso_week,
            "count": self.count,
        }


def week_start(moment: dt.datetime) -> dt.date:
    """The Monday (UTC) of the ISO week ``moment`` falls in."""
    day = moment.astimezone(dt.UTC).date()
    return day - dt.timedelta(days=day.weekday())


def expiries_per_week(records: Iterable[ManifestRecord]) -> list[WeekCount]:
    """One row per week from the first to the last expiry (empty weeks included).

    A device listed more than once counts with its latest certificate only.
    """
    latest: dict[str, str] = {}
    for record in records:
        latest[record.device_id] = record.not_after
    counts = Counter(week_start(dt.datetime.fromisoformat(value)) for value in latest.values())
    if not counts:
        return []
    first, last = min(counts), max(counts)
    weeks: list[WeekCount] = []
    current = first
    while current <= last:
        weeks.append(WeekCount(current, counts.get(current, 0)))
        current += dt.timedelta(weeks=1)
    return weeks


def render_png(weeks: list[WeekCount], path: Path, *, title: str = "Certificate expiries") -> Path:
    """A bar chart of ``weeks`` written to ``path`` (matplotlib, Agg backend: no display)."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache chatter
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(6.0, 0.25 * len(weeks) + 2), 4), dpi=100)
    try:
        positions = list(range(len(weeks)))
        axes.bar(positions, [w.count for w in weeks], width=0.85)
        step = max(1, len(weeks) // 20)
        axes.set_xticks(positions[::step], [w.iso_week for w in weeks][::step], rotation=60)
        axes.set_title(f"{title} per ISO week ({sum(w.count for w in weeks)} devices)")
        axes.set_xlabel("ISO week (UTC)")
        axes.set_ylabel("certificates expiring")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
