"""The fleet overview's cache: fresh while cheap, never on a reader's time once expensive."""

from __future__ import annotations

import threading
import time

from registry.stale_while_revalidate import CHEAP_S, StaleWhileRevalidate
from tests.support.waits import wait_for


class Counter:
    """A computation that returns 1, 2, 3 ... and takes ``cost_s`` (or raises when told)."""

    def __init__(self, cost_s: float) -> None:
        self.cost_s = cost_s
        self.calls = 0
        self.fail = False
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.cost_s)
            if self.fail:
                raise RuntimeError("database gone")
            with self._lock:
                self.calls += 1
                return self.calls
        finally:
            with self._lock:
                self.running -= 1


def test_a_cheap_value_is_computed_for_every_reader() -> None:
    compute = Counter(0)
    cache = StaleWhileRevalidate(compute, max_age_s=60)
    assert [cache.get() for _ in range(3)] == [1, 2, 3]


def test_an_expensive_value_is_answered_stale_and_refreshed_once_in_the_background() -> None:
    compute = Counter(CHEAP_S * 2)
    cache = StaleWhileRevalidate(compute, max_age_s=0.2)
    assert cache.get() == 1  # the first reader waits: there is nothing to answer yet
    started = time.monotonic()
    assert [cache.get() for _ in range(20)] == [1] * 20  # young enough: no refresh
    assert time.monotonic() - started < CHEAP_S  # no reader paid a computation
    assert compute.calls == 1
    time.sleep(0.25)
    readers = [threading.Thread(target=cache.get) for _ in range(10)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(5)
    assert wait_for(lambda: cache.get() == 2, 5)
    assert compute.most_at_once == 1  # one refresh for ten stale readers
    assert compute.calls == 2


def test_a_failed_refresh_keeps_the_last_value_and_the_next_reader_retries() -> None:
    compute = Counter(CHEAP_S * 2)
    cache = StaleWhileRevalidate(compute, max_age_s=0.05)
    assert cache.get() == 1
    compute.fail = True
    time.sleep(0.1)
    assert cache.get() == 1  # stale, and a refresh starts (and fails)
    assert wait_for(lambda: compute.running == 0, 5)
    compute.fail = False
    assert cache.get() == 1
    assert wait_for(lambda: cache.get() == 2, 5)


def test_a_fresh_value_is_shared_and_invalidate_makes_the_next_reader_recompute() -> None:
    compute = Counter(0)
    cache = StaleWhileRevalidate(compute, max_age_s=60, fresh_s=60)
    assert [cache.get() for _ in range(3)] == [1, 1, 1]  # several scrapers, one query
    cache.invalidate()
    assert cache.get() == 2  # cheap: recomputed on the spot


def test_an_expensive_invalidated_value_is_answered_stale_and_refreshed() -> None:
    compute = Counter(CHEAP_S * 2)
    cache = StaleWhileRevalidate(compute, max_age_s=60, fresh_s=60)
    assert cache.get() == 1
    cache.invalidate()
    assert cache.get() == 1  # the last value at once ...
    assert wait_for(lambda: cache.get() == 2, 5)  # ... and the new one soon after


def test_warm_computes_in_the_background_and_a_reader_meanwhile_waits_for_it() -> None:
    compute = Counter(0.3)
    cache = StaleWhileRevalidate(compute, max_age_s=60)
    started = time.monotonic()
    cache.warm()
    assert time.monotonic() - started < 0.1  # the caller (the registry's start) goes on
    assert wait_for(lambda: compute.running == 1, 5)
    cache.warm()  # already running: not a second computation
    assert cache.get() == 1  # waits for the warm-up instead of computing again
    assert compute.calls == 1 and compute.most_at_once == 1
    cache.warm()  # a value is there: nothing to do
    assert compute.calls == 1


def test_a_failed_warm_up_leaves_the_first_reader_to_compute() -> None:
    compute = Counter(0.1)
    compute.fail = True
    cache = StaleWhileRevalidate(compute, max_age_s=60)
    cache.warm()
    assert wait_for(lambda: compute.running == 1, 5)
    assert wait_for(lambda: compute.running == 0, 5)  # the warm-up failed
    compute.fail = False
    assert cache.get() == 1  # computed by the reader
    assert compute.calls == 1
