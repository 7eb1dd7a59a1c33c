"""Waking long-poll readers of the revocation feed when a revocation commits.

A decommission commits in a worker thread; :meth:`FeedNotifier.published` wakes every
waiter on whatever event loop it waits on. Readers take :attr:`generation` *before* reading
the database and pass it to :meth:`wait`, so a revocation committed between their read and
their wait is never missed. Revocations written by another process are seen by the
bounded re-read the route does every ``registry_feed_poll_seconds``.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["FeedNotifier"]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FeedNotifier:
    """Thread-safe broadcast of "the feed moved" to asyncio waiters on any loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._closed = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def published(self) -> None:
        """Call after a revocation committed (from any thread)."""
        with self._lock:
            self._generation += 1
            waiters = list(self._waiters)
            self._waiters.clear()
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)

    def close(self) -> None:
        """Shutting down: wake every waiter and make later waits return at once."""
        self._closed = True
        self.published()

    async def wait(self, generation: int, max_seconds: float) -> bool:
        """Wait until the feed moves past ``generation`` or ``max_seconds`` pass.

        Returns True when woken by a publication (or shutdown), False on timeout.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if self._closed or self._generation != generation:
                return True
            self._waiters.add(entry)
        try:
            await asyncio.wait_for(future, max_seconds)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters.discard(entry)
