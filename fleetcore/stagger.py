"""Staggered expiry: spread a batch's not_after evenly over a window.

A device's offset into the stagger window comes from its *rank* in the batch (the index in
``dev-000042``, or its row in the serials CSV) through the golden-ratio Weyl sequence
``frac(rank * (sqrt(5) - 1) / 2)``. That sequence has the lowest discrepancy known for
a one-dimensional sequence: for ranks 1..n, any sub-interval of the window (a day, an ISO
week) receives ``n * length / window`` devices plus or minus O(log n) — a few devices, not
the ``sqrt(n)`` scatter a hash of the device id would give. The bound also holds for every
prefix of the batch, so a batch killed half way is as evenly spread as a finished one, and
re-running the same input gives every device the same offset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math

__all__ = ["offset_in_window", "stagger_fraction", "stagger_fraction_for_id", "stagger_offset"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def stagger_fraction(rank: int) -> float:
    """Where in the window (0 <= f < 1) the device of this batch rank expires."""
    if rank < 0:
        raise ValueError(f"rank must be non-negative (got {rank})")
    return (rank * _GOLDEN) % 1.0


def offset_in_window(fraction: float, window: dt.timedelta) -> dt.timedelta:
    """``fraction`` (0 <= f < 1) of ``window``, in whole seconds (zero for an empty window)."""
    seconds = int(window.total_seconds())
    if seconds <= 0:
        return dt.timedelta(0)
    return dt.timedelta(seconds=int(fraction * seconds))


def stagger_offset(rank: int, window: dt.timedelta) -> dt.timedelta:
    """The offset added to issue time + lifetime for the device of this rank, whole seconds."""
    return offset_in_window(stagger_fraction(rank), window)


def stagger_fraction_for_id(device_id: str) -> float:
    """A device's place in the window from its id alone (a single CSR, which has no batch
    rank): uniform and deterministic, but without the batch bound of :func:`stagger_fraction`.
    """
    digest = hashlib.sha256(device_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)
