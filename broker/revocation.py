"""Following the registry's revocation feed into the broker's revoked set.

:class:`RevocationFollower` long-polls ``GET {registry}/api/v1/revocations?after=&wait=&epoch=``
over mTLS with the broker's service certificate (``clients/<broker>.crt``, trusting
``ca/root.crt``), and backs off exponentially while the registry is unreachable. The revoked
set itself (compact, journaled) is :class:`broker.revoked_set.RevokedSet`.

- **Resume.** It starts from the position persisted with the revoked set (the journal holds
  the position, the feed's epoch and the last applied event's fingerprint after every batch),
  not from 0: a start or a check costs what changed since, not the feed's history.
- **Divergence, without replaying history.** The follower sends its epoch; the registry
  answers at once, without waiting, when that epoch is not the feed's or the position is
  above the head (a database restored from an older copy or replaced). The follower then
  re-reads from 0, keeping every serial it has (the set never shrinks). Every ``resync_s``
  it also asks for the one event at its checkpoint and compares its fingerprint (kind,
  device, serials): a restored database that has already moved past the broker's position
  shows neither sign above but answers a different event there. The check also runs before
  the first read after a start or a failed read (the registry may come back restored).
- It asks for every event kind (:data:`fleetcore.revocation_feed.FOLLOWER_KINDS`): a
  ``superseded`` event revokes serials without decommissioning the device.
- **Below the feed's floor** (the registry compacted away events after its position): the
  answer says ``snapshot_required``; it reads the registry's snapshot of the live revoked
  state in pages (the next asked for while one is applied, each parsed and applied in
  slices on the loop, its serials added in bulk) and follows the tail
  from the snapshot's head.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# httpx imports its transport (httpcore, h11, anyio's asyncio backend) at the first client
# and the first request: 40-50 ms of imports on the loop, connections open, at every start
# (seen as the start's longest stall at a million devices, round 11). Imported here instead.
import anyio._backends._asyncio  # noqa: F401
import httpcore._backends.anyio  # noqa: F401
import httpx

from broker.revocation_journal import Checkpoint
from broker.revoked_set import EncodedSerials, RevokedSet, encode_serials
from fleetcore.revocation_feed import (
    FEED_BATCH_DEFAULT,
    FOLLOWER_KINDS,
    SNAPSHOT_NEXT_HEADER,
    SNAPSHOT_REASON,
    RevocationEvent,
    RevocationFeed,
    RevocationSnapshot,
)

__all__ = ["RevocationFollower", "RevokedSet", "fingerprint"]

log = logging.getLogger(__name__)

#: The longest the follower applies events before it hands the loop back: a packet takes
#: several turns of the loop through amqtt, each waiting for at most one slice.
APPLY_SLICE_S = 0.002
#: Events behind the head at which a catching-up follower reads the snapshot instead.
SNAPSHOT_GAP = 50_000
#: Serials per snapshot page: parsing one (on the loop) takes a few milliseconds.
SNAPSHOT_PAGE = 5_000
#: Serials of a snapshot page encoded and added in one go (about a millisecond).
SNAPSHOT_CHUNK = 500
#: Decommissioned devices of a snapshot page added in one go (each a callback: ~10 us).
SNAPSHOT_DEVICES = 100


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
        snapshot_gap: int | None = None,
        snapshot_page: int | None = None,
    ) -> None:
        self._snapshot_gap = SNAPSHOT_GAP if snapshot_gap is None else snapshot_gap
        self._snapshot_page = SNAPSHOT_PAGE if snapshot_page is None else snapshot_page
        self._url = registry_url.rstrip("/") + "/api/v1/revocations"
        self._revoked = revoked
        self._on_revoked = on_revoked
        self._tls_context = tls_context
        self._wait_s = wait_s
        self._max_backoff_s = max_backoff_s
        self._batch_limit = batch_limit
        # Resume where the journal says; its epoch is checked by the registry's answer.
        self.after = revoked.position
        self.epoch: int | None = revoked.epoch
        self.head_seq = 0
        self.resyncs = 0
        self.checks = 0
        self.snapshots = 0
        self._resync_s = resync_s
        # The checkpoint is checked before the first read (a resumed position), after any
        # failed read (the registry may come back restored), and every ``resync_s``.
        self._check_at = 0.0
        self.synced = asyncio.Event()  # set once the follower has caught up with the head
        self.last_success: float | None = None  # monotonic time of the last feed answer
        self.last_success_at = 0.0  # the same, POSIX time (a metric: alerts on feed silence)
        self.errors = 0

    async def run(self) -> None:
        """Follow the feed until cancelled."""
        backoff = 0.2
        timeout = httpx.Timeout(self._wait_s + 15.0, connect=5.0)
        log.info(
            "revocation feed following url=%s from=%d epoch=%s", self._url, self.after, self.epoch
        )
        async with httpx.AsyncClient(verify=self._tls_context, timeout=timeout) as client:
            while True:
                try:
                    if time.monotonic() >= self._check_at:
                        await self._check_position(client)
                    await self._poll_once(client)
                    backoff = 0.2
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    self.errors += 1
                    self._check_at = 0.0
                    log.warning(
                        "revocation feed unavailable url=%s after=%d error=%s retry_in_s=%.1f",
                        self._url,
                        self.after,
                        type(exc).__name__ + ": " + str(exc)[:200],
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff_s)

    async def _get(
        self, client: httpx.AsyncClient, after: int, wait: float, limit: int
    ) -> RevocationFeed:
        params: dict[str, str | int | float] = {
            "after": after,
            "wait": wait,
            "limit": limit,
            "kinds": FOLLOWER_KINDS,
        }
        if self.epoch is not None:
            params["epoch"] = self.epoch
        response = await client.get(self._url, params=params)
        response.raise_for_status()
        feed = RevocationFeed.model_validate_json(response.content)
        self.last_success = time.monotonic()
        self.last_success_at = time.time()
        return feed

    async def _poll_once(self, client: httpx.AsyncClient) -> None:
        catching_up = not self.synced.is_set()
        wait = 0 if catching_up else self._wait_s
        feed = await self._get(client, self.after, wait, self._batch_limit)
        if self._must_resync(feed.head_seq, feed.epoch):
            return
        if feed.snapshot_required or (
            catching_up and feed.head_seq - self.after > self._snapshot_gap
        ):
            # Below the floor, or so far behind that replaying would take longer than
            # reading the live state (a first start at a million devices: 530,000 events).
            await self._catch_up_from_snapshot(client)
            return
        await self.apply(feed.events)
        self.after = max(self.after, feed.last_seq)
        self.head_seq = feed.head_seq
        last = feed.events[-1] if feed.events else None
        checkpoint = self._revoked.checkpoint if last is None else fingerprint(last)
        self._revoked.advance(self.after, self.epoch, checkpoint)
        self._revoked.save()
        if self.after >= self.head_seq and not self.synced.is_set():
            log.info(
                "revocation feed synced seq=%d serials=%d", self.after, self._revoked.serial_count
            )
            self.synced.set()

    async def _check_position(self, client: httpx.AsyncClient) -> None:
        """Ask for the event at the checkpoint and compare fingerprints (one small read):
        a different event there means another history of the feed; start over. Done before
        anything after the checkpoint is applied, so the divergence is behind no new event."""
        self._check_at = time.monotonic() + self._resync_s
        self.checks += 1
        checkpoint = self._revoked.checkpoint
        if checkpoint is None:
            return
        feed = await self._get(client, checkpoint.seq - 1, 0, 1)
        if self._must_resync(feed.head_seq, feed.epoch):
            return
        found = feed.events[0] if feed.events else None
        if found is None or found.seq != checkpoint.seq:
            return  # compacted away by the registry: the epoch and head checks remain
        if fingerprint(found) != checkpoint:
            self._start_over(
                f"the feed's event {checkpoint.seq} is not the one applied (another history)",
                feed.epoch,
            )

    async def _catch_up_from_snapshot(self, client: httpx.AsyncClient) -> None:
        """Apply the registry's snapshot of the live revoked state, page by page (each
        parsed and applied in slices; the next page is asked for as soon as a
        page's answer names it, so the registry reads it while this one is parsed and
        applied), then follow from the first page's head (the set only grows: what a later
        page holds beyond that head is applied again from the tail, harmlessly)."""
        first: RevocationSnapshot | None = None
        serials = 0
        reading: asyncio.Task[tuple[bytes, str | None]] | None
        reading = asyncio.create_task(self._read_snapshot_page(client, ""))
        try:
            while reading is not None:
                body, named_next = await reading
                reading = None
                if named_next is not None:
                    reading = asyncio.create_task(self._read_snapshot_page(client, named_next))
                ready = _snapshot_page(body, self.after)  # one parse: a few ms
                page = ready.page
                await asyncio.sleep(0)
                if first is None:
                    if self._must_resync(page.head_seq, page.epoch):
                        return
                    first = page
                    log.warning(
                        "revocation feed: applying the registry's snapshot position=%d "
                        "floor=%d head_seq=%d devices=%d",
                        self.after,
                        page.floor,
                        page.head_seq,
                        len(page.devices),
                    )
                elif page.epoch != first.epoch:
                    self._start_over("feed epoch changed during the snapshot", page.epoch)
                    return
                if reading is None and page.next_after is not None:  # no header: older registry
                    reading = asyncio.create_task(self._read_snapshot_page(client, page.next_after))
                await self._apply_snapshot_page(ready)
                serials += len(page.not_after)
        finally:
            if reading is not None:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        assert first is not None
        log.info("revocation feed snapshot applied head_seq=%d serials=%d", first.head_seq, serials)
        self.snapshots += 1
        self.after = max(self.after, first.head_seq)
        self.head_seq = max(self.head_seq, first.head_seq)
        self._revoked.advance(self.after, self.epoch, None)  # no event to check there
        self._revoked.save()

    async def _read_snapshot_page(
        self, client: httpx.AsyncClient, after_serial: str
    ) -> tuple[bytes, str | None]:
        """One page of the snapshot (the serials above ``after_serial``), unparsed, and the
        next page's start when its answer names it (:data:`SNAPSHOT_NEXT_HEADER`)."""
        params: dict[str, str | int] = {"limit": self._snapshot_page}
        if after_serial:
            params["after_serial"] = after_serial
        response = await client.get(self._url + "/snapshot", params=params)
        response.raise_for_status()
        self.last_success = time.monotonic()
        self.last_success_at = time.time()
        return response.content, response.headers.get(SNAPSHOT_NEXT_HEADER)

    async def _apply_snapshot_page(self, ready: _SnapshotPage) -> None:
        """A snapshot page's serials, then its devices, a chunk at a time, handing the loop
        back at least every :data:`APPLY_SLICE_S`, then its issuing CAs as events."""
        slice_ends = time.perf_counter() + APPLY_SLICE_S
        added = 0
        for entries, journal_line in ready.encoded():
            if time.perf_counter() >= slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.perf_counter() + APPLY_SLICE_S
            new = self._revoked.add_encoded(entries, journal_line, ready.seq)
            added += len(new)
            self._on_revoked(ready.event, new)
        devices = ready.page.devices
        for start in range(0, len(devices), SNAPSHOT_DEVICES):
            if time.perf_counter() >= slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.perf_counter() + APPLY_SLICE_S
            chunk = devices[start : start + SNAPSHOT_DEVICES]
            for device_id in self._revoked.add_devices(chunk, ready.seq):
                self._on_revoked(ready.decommission(device_id), [])
        await self.apply(ready.issuers)
        # A page's lines written now (a quarter MB), from a worker thread: the whole
        # snapshot's at once held the loop for 100 ms at a million devices, and a page's
        # write(2) on the loop for 15-25 ms when the kernel throttled a busy disk's writeback
        # (round 11). The position is written last, and the compaction (merge, new snapshot
        # file) starts once, after the last page.
        await self._revoked.save_off_loop()
        log.debug(
            "revocation feed snapshot page serials=%d new=%d devices=%d",
            len(ready.page.not_after),
            added,
            len(devices),
        )

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
        if why is None:
            self.epoch = epoch if epoch is not None else self.epoch
            return False
        self._start_over(why, epoch)
        return True

    def _start_over(self, why: str, epoch: int | None) -> None:
        log.warning(
            "revocation feed resync from=0 after=%d reason=%r serials_kept=%d",
            self.after,
            why,
            self._revoked.serial_count,
        )
        self.epoch = epoch if epoch is not None else self.epoch
        self.after = 0
        self.resyncs += 1
        self._revoked.reset(self.epoch)
        self._revoked.save()
        self.synced.clear()  # catch up with wait=0 again

    async def apply(self, events: list[RevocationEvent]) -> None:
        """Apply events in order and drop affected sessions, handing the loop back at least
        every :data:`APPLY_SLICE_S` (a batch of a replay never stalls the connections)."""
        slice_ends = time.perf_counter() + APPLY_SLICE_S
        for event in events:
            if time.perf_counter() >= slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.perf_counter() + APPLY_SLICE_S
            self._apply_one(event)

    def _apply_one(self, event: RevocationEvent) -> None:
        decommission = event.kind == "decommission"
        known_device = not decommission or self._revoked.is_device_decommissioned(event.device_id)
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


@dataclass(frozen=True, slots=True)
class _SnapshotPage:
    """A snapshot page, parsed, its serials encoded chunk by chunk as they are applied."""

    page: RevocationSnapshot
    #: The position its serials are applied at (module doc of :func:`_snapshot_page`).
    seq: int
    #: Its serials with their not_after (:meth:`encoded` in chunks).
    serials: list[tuple[str, dt.datetime]]
    #: What the serials' chunks are applied as (the callback's view: no serials listed).
    event: RevocationEvent
    #: Its revoked issuing CAs (the first page's), as events.
    issuers: list[RevocationEvent]

    def encoded(self) -> Iterator[tuple[EncodedSerials, bytes]]:
        """Its serials in chunks of :data:`SNAPSHOT_CHUNK`, each encoded (well under a
        millisecond) as it is asked for, with its journal line."""
        for start in range(0, len(self.serials), SNAPSHOT_CHUNK):
            yield encode_serials(self.serials[start : start + SNAPSHOT_CHUNK], self.seq)

    def decommission(self, device_id: str) -> RevocationEvent:
        """The event a decommissioned device of the page is applied as (no serials)."""
        return self.event.model_copy(update={"device_id": device_id, "kind": "decommission"})


def _snapshot_page(body: bytes, position: int) -> _SnapshotPage:
    """A snapshot page, parsed (one C call: a few ms for a page of 5,000 on the loop; a
    worker thread would only contend for the GIL): at the snapshot's head
    on the last page, at the follower's ``position`` before it (the feed's sequence the
    broker reports applied reaches the head only once the whole snapshot is)."""
    page = RevocationSnapshot.model_validate_json(body)
    seq = page.head_seq if page.next_after is None else position
    # Built without validation: the page was validated.
    event = RevocationEvent.model_construct(
        seq=seq,
        device_id="snapshot",
        serials=[],
        reason=SNAPSHOT_REASON,
        revoked_at=page.read_at,
        kind="superseded",
        not_after={},
        issuer=None,
    )
    issuers = [
        event.model_copy(update={"device_id": key, "kind": "issuer_revoked", "issuer": key})
        for key in page.issuers
    ]
    return _SnapshotPage(page, seq, list(page.not_after.items()), event, issuers)


def fingerprint(event: RevocationEvent) -> Checkpoint:
    """An event's sequence number and a digest of what it revoked (kind, device, serials)."""
    text = f"{event.kind}|{event.device_id}|{','.join(sorted(event.serials))}"
    return Checkpoint(event.seq, hashlib.sha256(text.encode()).hexdigest()[:32])
