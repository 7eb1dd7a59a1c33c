"""A value computed at most once per ``max_age_s`` however many readers ask, and never on a
reader's time once it has become expensive: the console's fleet overview (issue 23).

The fleet overview (counts by status, seen in the last minute, expiries per week and per horizon,
latest revocations) is a handful of aggregate queries over every device and certificate: a
few milliseconds at 10,000 devices, hundreds at 1,000,000. Every open console polls it every
5 s (``console.js``). So:

- while computing it is cheap (its last computation took under :data:`CHEAP_S`), every
  request computes it: small fleets always see it fresh, as before;
- once it is expensive, the last overview is answered at once and, when it is older than
  ``max_age_s``, recomputed in the background (one computation at a time: *stale while
  revalidate*). The page stays fast and is at most ``max_age_s`` plus one computation old;
  a decommission shows on the device's own page at once (never cached) and on the fleet
  page within that bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["CHEAP_S", "StaleWhileRevalidate"]

log = logging.getLogger(__name__)

#: A computation shorter than this is done on the request's time when the value is stale.
CHEAP_S = 0.05

T = TypeVar("T")


class StaleWhileRevalidate(Generic[T]):
    """One value computed by ``compute``, at most ``max_age_s`` old when cheap (module doc)."""

    def __init__(
        self,
        compute: Callable[[], T],
        max_age_s: float = 5.0,
        fresh_s: float = 0.0,
        name: str = "fleet overview",
    ) -> None:
        """``max_age_s``: an expensive value older than this is recomputed in the
        background; ``fresh_s``: a value younger than this is answered whatever it cost
        (several readers, one computation); ``name``: what the logs call it."""
        self._compute = compute
        self._name = name
        self._max_age_s = max_age_s
        self._fresh_s = fresh_s
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at = 0.0
        self._cost_s = 0.0
        self._refreshing = False
        #: Set whenever no background computation is running (a reader with no value
        #: waits for a running one instead of computing it twice).
        self._idle = threading.Event()
        self._idle.set()

    def warm(self) -> None:
        """Compute the value in the background now (at start: the first reader of an
        expensive value then gets it without computing it on its time)."""
        with self._lock:
            if self._value is not None or self._refreshing:
                return
            self._start_refresh()

    def get(self) -> T:
        """The value: computed now while that is cheap; once it is expensive, the last one
        (recomputed in the background when older than ``max_age_s``)."""
        with self._lock:
            value, age = self._value, time.monotonic() - self._at
            if value is not None and age < self._fresh_s:
                return value
            if value is not None and self._cost_s >= CHEAP_S:
                if not self._refreshing and age >= self._max_age_s:
                    self._start_refresh()
                return value
            first_running = value is None and self._refreshing
        if first_running:  # the warm-up is computing it: wait for it
            self._idle.wait()
            with self._lock:
                if self._value is not None:
                    return self._value
        return self._store(self._timed())

    def _start_refresh(self) -> None:
        """Under the lock: one background computation."""
        self._refreshing = True
        self._idle.clear()
        threading.Thread(target=self._refresh, name="certfleet-stale-refresh", daemon=True).start()

    def invalidate(self) -> None:
        """The value changed: recompute it at the next reading (in the background when
        expensive; that reading still gets the last value)."""
        with self._lock:
            self._at = float("-inf")

    def _timed(self) -> tuple[T, float, float]:
        started = time.monotonic()
        value = self._compute()
        return value, started, time.monotonic() - started

    def _store(self, computed: tuple[T, float, float]) -> T:
        value, started, cost = computed
        with self._lock:
            if started >= self._at or self._at == float("-inf"):
                self._value, self._at, self._cost_s = value, started, cost
            return value

    def _refresh(self) -> None:
        try:
            self._store(self._timed())
        except Exception:  # the next request tries again; the stale value stays
            log.exception("stale value not refreshed what=%r", self._name)
        finally:
            with self._lock:
                self._refreshing = False
                self._idle.set()
