"""The expiry histogram as SVG geometry, computed on the server (the browser fetches no
plotting library). The template draws it; Jinja escapes every label."""

from __future__ import annotations

from dataclasses import dataclass

from registry.models import WeekCount

__all__ = ["Bar", "Histogram", "weekly_histogram"]

WIDTH = 720
HEIGHT = 200
MARGIN_LEFT = 44
MARGIN_BOTTOM = 28
MARGIN_TOP = 12
#: Weeks drawn; later expiries are summed into ``later``.
MAX_WEEKS = 104


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    week_start: str
    count: int


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class Histogram:
    width: int
    height: int
    plot_left: int
    plot_bottom: int
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    later: int
    total: int


def _nice_max(value: int) -> int:
    """The smallest 1-2-5 step multiple at or above ``value`` (axis top)."""
    if value <= 5:
        return 5
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def weekly_histogram(weeks: list[WeekCount]) -> Histogram:
    """Bars for the first MAX_WEEKS weeks, y axis from 0 to a round maximum."""
    shown, rest = weeks[:MAX_WEEKS], weeks[MAX_WEEKS:]
    plot_bottom = HEIGHT - MARGIN_BOTTOM
    plot_height = plot_bottom - MARGIN_TOP
    plot_width = WIDTH - MARGIN_LEFT - 8
    top = _nice_max(max((w.count for w in shown), default=0))
    slot = plot_width / max(len(shown), 1)
    bars = []
    for index, week in enumerate(shown):
        height = plot_height * week.count / top
        bars.append(
            Bar(
                x=round(MARGIN_LEFT + index * slot + slot * 0.1, 1),
                y=round(plot_bottom - height, 1),
                width=round(max(slot * 0.8, 1.0), 1),
                height=round(height, 1),
                week_start=week.week_start.isoformat(),
                count=week.count,
            )
        )
    y_ticks = [
        Tick(round(plot_bottom - plot_height * i / 4, 1), f"{top * i // 4:,}") for i in range(5)
    ]
    every = max(1, len(shown) // 8)
    x_ticks = [Tick(round(b.x + b.width / 2, 1), b.week_start) for b in bars[::every]]
    return Histogram(
        width=WIDTH,
        height=HEIGHT,
        plot_left=MARGIN_LEFT,
        plot_bottom=plot_bottom,
        bars=bars,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        later=sum(w.count for w in rest),
        total=sum(w.count for w in weeks),
    )
