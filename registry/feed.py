"""Waking long-poll readers of the revocation feed when a revocation commits, and sharing
one read of the feed among every long-poll woken together (:class:`SharedReads`).

A decommission commits in a worker thread; :meth:`FeedNotifier.published` wakes every
waiter on whatever event loop it waits on. Readers take :attr:`generation` *before* reading
the database and pass it to :meth:`wait`, so a revocation committed between their read and
their wait is never missed. Revocations written by another process are seen by the
bounded re-read the route does every ``registry_feed_poll_seconds``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

from fleetcore.revocation_feed import RevocationFeed

__all__ = ["FeedAnswer", "FeedNotifier", "SharedReads"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


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


@dataclass(frozen=True)
class FeedAnswer:
    """One answer of the feed and its JSON body, encoded once for every caller it goes to."""

    feed: RevocationFeed
    body: bytes

    @classmethod
    def of(cls, feed: RevocationFeed) -> FeedAnswer:
        return cls(feed, feed.model_dump_json().encode())


#: What identifies one read of the feed: ``after``, ``limit`` and the kinds asked for.
FeedKey = tuple[int, int, tuple[str, ...]]


@dataclass
class _SharedRead(Generic[T]):
    started: float
    task: asyncio.Future[T]


class SharedReads(Generic[K, T]):
    """One read of the feed for every long-poll woken by the same publication.

    A publication wakes every parked long-poll at once; each would read the same events
    (same ``after``, ``limit`` and kinds) and encode the same answer. :meth:`get` runs one
    read per (loop, generation, key) in a worker thread and hands its result to every caller
    that asks while it runs or up to ``fresh_s`` after it started, at the same generation.
    Sharing is sound because a reader takes the generation *before* asking: a read started
    at the generation it saw includes every revocation published before it, and one
    committed later moves the generation (so its waiters read again). ``fresh_s`` bounds how
    stale a shared answer may be for writes of another process, which are seen by the
    periodic re-read only (no publication in this process).
    """

    def __init__(self, fresh_s: float = 0.25, keep: int = 64) -> None:
        self._fresh_s = fresh_s
        self._keep = keep
        self._reads: dict[tuple[asyncio.AbstractEventLoop, int, K], _SharedRead[T]] = {}
        #: Reads run (for tests and metrics): callers minus the ones that shared.
        self.reads = 0

    async def get(self, generation: int, key: K, read: Callable[[], T]) -> T:
        """``read()`` (in a worker thread), or the result of the same read already made."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        index = (loop, generation, key)
        shared = self._reads.get(index)
        if shared is None or (shared.task.done() and now - shared.started > self._fresh_s):
            if len(self._reads) >= self._keep:
                self._forget(now)
            shared = _SharedRead(now, asyncio.ensure_future(run_in_threadpool(read)))
            shared.task.add_done_callback(lambda task: self._failed(index, task))
            self._reads[index] = shared
            self.reads += 1
        # shield: a caller that goes away (its client disconnected) does not cancel the read
        # the others wait for.
        return await asyncio.shield(shared.task)

    def _failed(
        self, index: tuple[asyncio.AbstractEventLoop, int, K], task: asyncio.Future[T]
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            self._reads.pop(index, None)  # the next caller tries again

    def _forget(self, now: float) -> None:
        for index, shared in list(self._reads.items()):
            if shared.task.done() and now - shared.started > self._fresh_s:
                del self._reads[index]
