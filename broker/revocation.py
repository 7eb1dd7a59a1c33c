"""Revoked serials: the in-memory set, its copy on disk, and the registry feed follower.

- :class:`RevokedSet` holds revoked serials (lower-case hex, :func:`fleetcore.profile.serial_hex`)
  and decommissioned device ids in Python sets (O(1) checks at every CONNECT). It is loaded
  from ``<data>/broker/revoked-<node>.json`` at start (or, once, from the single-broker
  ``broker/revoked.json`` of earlier versions), so a restart while the registry is down is no
  hole, and written back atomically after every batch that changed it. Revocation is
  permanent: a set only grows. A write that fails (disk full, folder read-only or replaced)
  never stops enforcement: the sets are already changed in memory, the failure is logged and
  counted, and :meth:`RevokedSet.keep_persisted` retries with backoff until the disk is back.
  The one exception to "only grows": a serial whose certificate has expired (its not_after,
  carried by the feed, plus :data:`fleetcore.profile.CLOCK_SKEW`) can no longer be presented,
  so :meth:`RevokedSet.prune` forgets it, on load and every ``prune_s``
  (:meth:`RevokedSet.keep_pruned`). Serials whose not_after is unknown, and decommissioned
  device ids, are kept for good.
- :class:`RevocationFollower` long-polls ``GET {registry}/api/v1/revocations?after=&wait=``
  over mTLS with the broker's service certificate (``clients/<broker>.crt``, trusting
  ``ca/root.crt``). It starts from ``after=0`` (full resync) every time, resumes from the
  last sequence it applied, and backs off exponentially while the registry is unreachable.
  It re-reads from 0 (keeping every serial it has: the sets never shrink) when the feed's
  head is below its position or the feed's epoch changed (the registry's database was
  restored from a backup or replaced), and every ``resync_s`` as a backstop (a restored
  database that has already moved past the broker's position shows neither sign). It asks
  for every event kind (:data:`fleetcore.revocation_feed.FOLLOWER_KINDS`): a ``superseded``
  event revokes serials without decommissioning the device.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import httpx

from broker.errors import RevocationStateError
from fleetcore.layout import write_public
from fleetcore.profile import CLOCK_SKEW
from fleetcore.revocation_feed import (
    FEED_BATCH_DEFAULT,
    FOLLOWER_KINDS,
    RevocationEvent,
    RevocationFeed,
)

__all__ = ["RevocationFollower", "RevokedSet"]

log = logging.getLogger(__name__)


class RevokedSet:
    """Revoked serials and decommissioned devices, persisted to one JSON file."""

    def __init__(
        self,
        path: Path | None,
        *,
        legacy_path: Path | None = None,
        on_write: Callable[[bool], None] = lambda _ok: None,
    ) -> None:
        self.path = path
        self.legacy_path = legacy_path
        self.serials: set[str] = set()
        #: serial -> its certificate's not_after (POSIX seconds), where the feed said.
        self.not_after: dict[str, float] = {}
        self.device_ids: set[str] = set()
        self.last_seq = 0
        #: True while the file lags behind the sets (a write failed; retried).
        self.dirty = False
        #: Why the last write failed, while :attr:`dirty`.
        self.persist_error: str | None = None
        self._on_write = on_write
        self._failed = asyncio.Event()

    # -- checks (RevocationView) ----------------------------------------------------------

    def is_serial_revoked(self, serial: str) -> bool:
        return serial in self.serials

    def is_device_decommissioned(self, device_id: str) -> bool:
        return device_id in self.device_ids

    # -- changes --------------------------------------------------------------------------

    def add(
        self,
        serials: Iterable[str],
        device_id: str | None = None,
        seq: int | None = None,
        not_after: Mapping[str, dt.datetime] | None = None,
    ) -> list[str]:
        """Add serials (and a decommissioned device id); return the serials that were new.

        A serial whose ``not_after`` (plus the clock-skew margin) has passed is not added:
        it cannot be presented any more (a resync re-reads old events).
        """
        expiry = {s.lower(): when.timestamp() for s, when in (not_after or {}).items()}
        limit = time.time() - CLOCK_SKEW.total_seconds()
        new = []
        for serial in (s.lower() for s in serials):
            if serial in expiry:
                if expiry[serial] < limit:
                    continue
                self.not_after[serial] = expiry[serial]
            if serial not in self.serials:
                new.append(serial)
        self.serials.update(new)
        if device_id is not None:
            self.device_ids.add(device_id)
        if seq is not None and seq > self.last_seq:
            self.last_seq = seq
        return new

    def prune(self, now: float | None = None) -> list[str]:
        """Forget serials whose certificate expired more than CLOCK_SKEW ago; return them."""
        limit = (time.time() if now is None else now) - CLOCK_SKEW.total_seconds()
        expired = [s for s, when in self.not_after.items() if when < limit]
        for serial in expired:
            del self.not_after[serial]
            self.serials.discard(serial)
        if expired:
            log.info("revoked set pruned expired=%d serials=%d", len(expired), len(self.serials))
        return expired

    async def keep_pruned(self, prune_s: float, on_pruned: Callable[[int], None]) -> None:
        """Every ``prune_s`` seconds, forget expired serials (and persist); forever."""
        while True:
            await asyncio.sleep(prune_s)
            expired = self.prune()
            if expired:
                self.save()
                on_pruned(len(expired))

    # -- disk -----------------------------------------------------------------------------

    def load(self) -> None:
        """Read the persisted set; a missing file is an empty set, a corrupt one an error.

        Without a file of its own, the set starts from the legacy path (the one file every
        broker wrote before files were named by node), and writes its own file at once.
        """
        if self.path is None:
            return
        source = self.path
        if not source.exists():
            if self.legacy_path is None or not self.legacy_path.exists():
                return
            source = self.legacy_path
        self._read(source)
        if source != self.path:
            log.info("revoked set migrated from=%s to=%s", source, self.path)
            self.save()

    def _read(self, source: Path) -> None:
        try:
            body = json.loads(source.read_text())
            serials = {str(s).lower() for s in body["serials"]}
            device_ids = {str(d) for d in body.get("device_ids", [])}
            last_seq = int(body.get("last_seq", 0))
            not_after = {str(s).lower(): float(t) for s, t in body.get("not_after", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RevocationStateError(
                f"{source} is unreadable ({exc}); restore it from a backup or remove it to "
                "rebuild it from the registry feed (refuses nothing until the feed is read)"
            ) from None
        self.serials |= serials
        self.not_after.update({s: t for s, t in not_after.items() if s in serials})
        self.device_ids |= device_ids
        self.last_seq = max(self.last_seq, last_seq)
        self.prune()
        log.info(
            "revoked set loaded path=%s serials=%d devices=%d last_seq=%d",
            source,
            len(self.serials),
            len(self.device_ids),
            self.last_seq,
        )

    def save(self) -> bool:
        """Write the sets atomically; False (logged, counted, retried by
        :meth:`keep_persisted`) when the disk refuses. Never raises: enforcement goes on."""
        if self.path is None:
            return True
        body = {
            "last_seq": self.last_seq,
            "serials": sorted(self.serials),
            "device_ids": sorted(self.device_ids),
            "not_after": {s: self.not_after[s] for s in sorted(self.not_after)},
        }
        try:
            write_public(self.path, json.dumps(body).encode())
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            if not self.dirty:
                log.error(
                    "revoked set not persisted path=%s error=%s serials=%d "
                    "(enforced in memory; retrying)",
                    self.path,
                    error,
                    len(self.serials),
                )
            self.dirty, self.persist_error = True, error
            self._on_write(False)
            self._failed.set()
            return False
        if self.dirty:
            log.info("revoked set persisted again path=%s serials=%d", self.path, len(self.serials))
        self.dirty, self.persist_error = False, None
        self._on_write(True)
        return True

    async def keep_persisted(self, min_backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        """Retry a failed write with exponential backoff until it succeeds; forever."""
        while True:
            await self._failed.wait()
            self._failed.clear()
            backoff = min_backoff_s
            while self.dirty:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff_s)
                self.save()


#: Called with each newly applied event and the serials in it that were not yet revoked.
OnRevoked = Callable[[RevocationEvent, list[str]], None]


class RevocationFollower:
    """Follow the registry's revocation feed into a :class:`RevokedSet`."""

    def __init__(
        self,
        *,
        registry_url: str,
        revoked: RevokedSet,
        on_revoked: OnRevoked,
        tls_context: ssl.SSLContext,
        wait_s: int = 25,
        max_backoff_s: float = 10.0,
        batch_limit: int = FEED_BATCH_DEFAULT,
        resync_s: float = 300.0,
    ) -> None:
        self._url = registry_url.rstrip("/") + "/api/v1/revocations"
        self._revoked = revoked
        self._on_revoked = on_revoked
        self._tls_context = tls_context
        self._wait_s = wait_s
        self._max_backoff_s = max_backoff_s
        self._batch_limit = batch_limit
        self.after = 0  # full resync from the start of the feed on every start
        self.head_seq = 0
        self.epoch: int | None = None
        self.resyncs = 0
        self._resync_s = resync_s
        self._resync_at = time.monotonic() + resync_s
        self.synced = asyncio.Event()  # set once the follower has caught up with the head
        self.last_success: float | None = None  # monotonic time of the last feed answer
        self.last_success_at = 0.0  # the same, POSIX time (a metric: alerts on feed silence)
        self.errors = 0

    async def run(self) -> None:
        """Follow the feed until cancelled."""
        backoff = 0.2
        timeout = httpx.Timeout(self._wait_s + 15.0, connect=5.0)
        async with httpx.AsyncClient(verify=self._tls_context, timeout=timeout) as client:
            while True:
                try:
                    await self._poll_once(client)
                    backoff = 0.2
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    self.errors += 1
                    log.warning(
                        "revocation feed unavailable url=%s after=%d error=%s retry_in_s=%.1f",
                        self._url,
                        self.after,
                        type(exc).__name__ + ": " + str(exc)[:200],
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff_s)

    async def _poll_once(self, client: httpx.AsyncClient) -> None:
        catching_up = not self.synced.is_set()
        wait = 0 if catching_up else self._wait_s
        response = await client.get(
            self._url,
            params={
                "after": self.after,
                "wait": wait,
                "limit": self._batch_limit,
                "kinds": FOLLOWER_KINDS,
            },
        )
        response.raise_for_status()
        feed = RevocationFeed.model_validate_json(response.content)
        self.last_success = time.monotonic()
        self.last_success_at = time.time()
        if self._must_resync(feed.head_seq, feed.epoch):
            return
        self.apply(feed.events)
        self.after = max(self.after, feed.last_seq)
        self.head_seq = feed.head_seq
        if self.after >= self.head_seq and not self.synced.is_set():
            log.info(
                "revocation feed synced seq=%d serials=%d", self.after, len(self._revoked.serials)
            )
            self.synced.set()

    def not_following(self) -> list[str]:
        """Why the broker is not following the feed right now (for /readyz); empty when it
        has caught up and the registry answered within a long-poll and a retry."""
        if not self.synced.is_set():
            return [f"the revocation feed ({self._url}): not caught up yet"]
        silent_for = time.monotonic() - (self.last_success or 0.0)
        if silent_for > self._wait_s + 15.0 + self._max_backoff_s:
            return [f"the revocation feed ({self._url}): no answer for {silent_for:.0f}s"]
        return []

    def _must_resync(self, head_seq: int, epoch: int | None) -> bool:
        """Start over from 0 when the feed is not the one the position was reached in."""
        why = None
        if self.epoch is not None and epoch is not None and epoch != self.epoch:
            why = f"feed epoch changed from {self.epoch} to {epoch} (registry database replaced)"
        elif head_seq < self.after:
            why = f"feed head {head_seq} is below position {self.after} (registry restored?)"
        elif self.after > 0 and time.monotonic() >= self._resync_at:
            why = f"periodic resync every {self._resync_s:.0f}s"
        self.epoch = epoch if epoch is not None else self.epoch
        if why is None:
            return False
        log.warning(
            "revocation feed resync from=0 after=%d reason=%r serials_kept=%d",
            self.after,
            why,
            len(self._revoked.serials),
        )
        self.after = 0
        self.resyncs += 1
        self._resync_at = time.monotonic() + self._resync_s
        self.synced.clear()  # catch up with wait=0 again
        return True

    def apply(self, events: list[RevocationEvent]) -> None:
        """Apply events in order, drop affected sessions, then persist once for the batch."""
        for event in events:
            decommission = event.kind == "decommission"
            known_device = not decommission or event.device_id in self._revoked.device_ids
            new_serials = self._revoked.add(
                event.serials,
                event.device_id if decommission else None,
                event.seq,
                event.not_after,
            )
            lag = time.time() - event.revoked_at.timestamp()
            if new_serials or not known_device:
                log.info(
                    "device revoked kind=%s device_id=%s serials=%s seq=%d reason=%r lag_s=%s",
                    event.kind,
                    event.device_id,
                    ",".join(new_serials),
                    event.seq,
                    event.reason[:100],
                    f"{lag:.3f}",
                )
            self._on_revoked(event, new_serials)
        if events:
            self._revoked.save()
