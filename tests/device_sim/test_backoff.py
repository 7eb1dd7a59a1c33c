"""Reconnect backoff: exponential ceiling, full jitter, bounded by the cap."""

from __future__ import annotations

import random
import statistics

import pytest

from device_sim.backoff import Backoff


def test_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(1))
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


def test_delays_are_jittered_over_the_whole_window_and_never_exceed_it() -> None:
    rng = random.Random(42)
    delays = []
    for _ in range(2000):
        backoff = Backoff(base=1.0, cap=30.0, rng=rng)
        backoff.attempt = 3  # ceiling 8 s
        delays.append(backoff.next_delay())
    assert all(0.0 <= d <= 8.0 for d in delays)
    # Full jitter: uniform over [0, 8] -> mean ~4, and spread over the whole window
    # (no thundering herd: devices that dropped together come back at different times).
    assert 3.6 < statistics.mean(delays) < 4.4
    assert min(delays) < 0.5 and max(delays) > 7.5
    assert len({round(d, 6) for d in delays}) > 1990


def test_reset_after_a_successful_connect_starts_small_again() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(3))
    for _ in range(10):
        backoff.next_delay()
    assert backoff.ceiling() == 30.0
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_huge_attempt_counts_stay_bounded() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(5))
    backoff.attempt = 10_000
    assert backoff.next_delay() <= 30.0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_backoff_refuses_a_window_that_cannot_work(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(base=base, cap=cap)
