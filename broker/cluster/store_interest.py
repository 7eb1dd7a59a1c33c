"""Whether a QoS 1 message must be stored in JetStream: does a persistent subscription
anywhere in the cluster want it?

Every persistent session's filters are recorded in the KV bucket
:data:`~broker.cluster.durable.SESSIONS_BUCKET` (``{"key": ..., "filters": {filter: qos}}``).
Each node watches the bucket and keeps the QoS >= 1 filters in a :class:`FilterIndex`. A
QoS 1 PUBLISH whose topic matches one of them is stored (its PUBACK waits for JetStream);
any other is acknowledged at once and routed live, which is what most fleet traffic is
(telemetry nobody holds a persistent session for).

The answer errs on the side of storing: until the watch has delivered the bucket's
current contents, and while NATS is unreachable, every QoS 1 message counts as needing
the store (so its PUBACK is withheld, never given falsely). A persistent subscription
made on another node moments ago may not be seen yet; a message published in that window
is routed live with ``stored`` off, and the subscriber, when connected, gets it live
(docs/cluster.md, "What is stored").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from typing import Any

import nats
from nats.js.kv import KeyValue

from broker.cluster.filter_index import FilterIndex

__all__ = ["StoreInterest", "stored_filters"]

log = logging.getLogger(__name__)

_DELETES = ("DEL", "PURGE")


def stored_filters(record: bytes | None) -> frozenset[str]:
    """The filters of a session record that are served from the store (QoS >= 1)."""
    if not record:
        return frozenset()
    try:
        filters = json.loads(record).get("filters", {})
        return frozenset(str(f) for f, qos in filters.items() if int(qos) >= 1)
    except (ValueError, TypeError, AttributeError):
        log.warning("session record unreadable (ignored) size=%d", len(record))
        return frozenset()


class StoreInterest:
    """The cluster's persistent QoS >= 1 filters, kept current from the sessions bucket."""

    def __init__(self, forget_after_s: float | None = None) -> None:
        #: A record not written again for this long is forgotten (the bucket's TTL removes
        #: it without telling watchers; a connected session's record is rewritten sooner).
        self.forget_after_s = forget_after_s
        self._index = FilterIndex()
        self._records: dict[str, frozenset[str]] = {}
        self._revisions: dict[str, int] = {}
        self._written: dict[str, float] = {}
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    @property
    def ready(self) -> bool:
        """True once the bucket's contents are known (and the watch is live)."""
        return self._ready

    def needs_store(self, topic: str) -> bool:
        """True when a QoS 1 message on ``topic`` must be stored before its PUBACK."""
        return not self._ready or self._index.matches(topic)

    def forget_stale(self, now: float | None = None) -> int:
        """Drop the records not written for ``forget_after_s`` (``now``: Unix time); how
        many were dropped."""
        if self.forget_after_s is None:
            return 0
        limit = (time.time() if now is None else now) - self.forget_after_s
        stale = [key for key, written in self._written.items() if written < limit]
        for key in stale:
            del self._written[key]
            self.apply(key, None)
            self._written.pop(key, None)
        return len(stale)

    def apply(
        self,
        key: str,
        record: bytes | None,
        revision: int | None = None,
        written_at: float | None = None,
    ) -> None:
        """Take in the record stored under ``key`` (None or empty: deleted) at ``revision``
        (an older revision than one already taken in is ignored), written at the Unix time
        ``written_at`` (now when not given)."""
        if revision is not None:
            if revision <= self._revisions.get(key, 0):
                return
            self._revisions[key] = revision
        self._written[key] = time.time() if written_at is None else written_at
        new = stored_filters(record)
        old = self._records.pop(key, frozenset())
        for topic_filter in old - new:
            self._index.remove(topic_filter)
        for topic_filter in new - old:
            self._index.add(topic_filter)
        if new:
            self._records[key] = new

    async def watch(self, bucket: KeyValue) -> None:
        """(Re)start following ``bucket``: rebuilt from its contents, then its updates."""
        await self.stop()
        self._index = FilterIndex()
        self._records = {}
        self._revisions = {}
        self._written = {}
        watcher = await bucket.watchall()
        self._watcher = watcher
        self._task = asyncio.get_running_loop().create_task(self._follow(watcher))

    async def _follow(self, watcher: Any) -> None:
        forgetting = None
        if self.forget_after_s is not None:
            forgetting = asyncio.get_running_loop().create_task(self._forget_loop())
        try:
            async for entry in watcher:
                if entry is None:  # the bucket's current contents have all been delivered
                    self._ready = True
                    log.info("store interest ready persistent_filters=%d", len(self._index))
                    continue
                if entry.key is None:
                    continue
                deleted = entry.operation in _DELETES
                created: Any = getattr(entry, "created", None)  # a datetime (nats-py 2.x)
                written_at = created.timestamp() if isinstance(created, dt.datetime) else None
                self.apply(entry.key, None if deleted else entry.value, entry.revision, written_at)
        finally:
            self._ready = False
            if forgetting is not None:
                forgetting.cancel()

    async def _forget_loop(self) -> None:
        assert self.forget_after_s is not None
        while True:
            await asyncio.sleep(max(self.forget_after_s / 8, 0.5))
            if dropped := self.forget_stale():
                log.info("store interest forgot expired session records records=%d", dropped)

    async def stop(self) -> None:
        """Stop following (the answer is "store" until :meth:`watch` again)."""
        self._ready = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._watcher is not None:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self._watcher.stop()
            self._watcher = None
