"""Reconnect delays: exponential backoff with full jitter.

After a broker restart every device loses its connection at the same instant. Without jitter
they would all come back at the same instants too (a thundering herd that can knock the broker
over again). With full jitter each delay is drawn uniformly from ``[0, min(cap, base * 2**n)]``,
which spreads the fleet over the whole window (AWS Architecture Blog, "Exponential Backoff
And Jitter").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """The delay before each reconnect attempt; :meth:`reset` after a successful connect."""

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return float(min(self.cap, self.base * 2.0 ** min(self.attempt, 32)))

    def next_delay(self) -> float:
        """The next delay in seconds (uniform in [0, ceiling]); advances the attempt count."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
