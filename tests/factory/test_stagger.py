"""Staggered expiry: no ISO week (or day) holds more than its even share plus a few devices."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest

from factory.batch import counted_devices
from factory.report import week_start
from fleetcore.stagger import stagger_fraction, stagger_fraction_for_id, stagger_offset

ISSUED = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
LIFETIME = dt.timedelta(days=365)
WINDOW = dt.timedelta(days=90)
TOLERANCE = 5  # devices above the even share, for any bucket, at any batch size tested


def _expiries(count: int) -> list[dt.datetime]:
    return [
        ISSUED + LIFETIME + stagger_offset(spec.rank, WINDOW) for spec in counted_devices(count)
    ]


def _worst_excess(expiries: list[dt.datetime], bucket: dt.timedelta) -> float:
    """Largest (count - even share) over buckets; the share counts only the window's overlap."""
    start_of_window = ISSUED + LIFETIME
    end_of_window = start_of_window + WINDOW
    if bucket == dt.timedelta(weeks=1):
        starts = Counter(week_start(moment) for moment in expiries)
    else:
        starts = Counter(moment.date() for moment in expiries)
    worst = float("-inf")
    for day, count in starts.items():
        begin = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        overlap = min(begin + bucket, end_of_window) - max(begin, start_of_window)
        share = len(expiries) * overlap / WINDOW
        worst = max(worst, count - share)
    return worst


@pytest.mark.parametrize("count", [10_000, 3_333])
def test_no_week_holds_more_than_its_even_share(count: int) -> None:
    expiries = _expiries(count)
    assert all(ISSUED + LIFETIME <= moment < ISSUED + LIFETIME + WINDOW for moment in expiries)
    assert _worst_excess(expiries, dt.timedelta(weeks=1)) <= TOLERANCE


def test_no_day_holds_more_than_its_even_share() -> None:
    assert _worst_excess(_expiries(10_000), dt.timedelta(days=1)) <= TOLERANCE


def test_a_killed_batch_prefix_is_spread_evenly_too() -> None:
    assert _worst_excess(_expiries(10_000)[:1_234], dt.timedelta(weeks=1)) <= TOLERANCE


def test_offset_is_deterministic_and_inside_the_window() -> None:
    assert stagger_offset(42, WINDOW) == stagger_offset(42, WINDOW)
    assert all(0.0 <= stagger_fraction(rank) < 1.0 for rank in range(0, 5000))
    assert stagger_offset(7, dt.timedelta(0)) == dt.timedelta(0)
    assert stagger_fraction_for_id("dev-1") == stagger_fraction_for_id("dev-1")
    assert 0.0 <= stagger_fraction_for_id("dev-1") < 1.0
    with pytest.raises(ValueError, match="rank must be non-negative"):
        stagger_fraction(-1)
