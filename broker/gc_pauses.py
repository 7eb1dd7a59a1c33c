"""How long the interpreter's cyclic garbage collector stops the broker.

A collection runs on whichever thread allocated last and holds the GIL throughout: every
connection of the node waits for it. A full (generation 2) pass walks every container object
the process holds, so its cost grows with the connected sessions (amqtt keeps a few hundred
objects per session). Each pass is observed into ``certfleet_broker_gc_pause_seconds`` by
generation, so a loop lag (:mod:`broker.loop_lag`) can be told apart from a collection.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

__all__ = ["GcPauses"]


class GcPauses:
    """Observes each collection's duration while started (process-wide, as gc is)."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._began = 0.0

    def start(self) -> None:
        """Begin observing (idempotent)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        """Stop observing."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began:
            self._observe(int(info.get("generation", 0)), time.perf_counter() - self._began)
            self._began = 0.0
