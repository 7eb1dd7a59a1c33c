"""The broker's revoked set: compact in memory, journaled on disk, O(change) per event.

- Serials live in a :class:`broker.serial_table.SerialTable` (24 bytes a serial in a sorted
  buffer, plus a small dict of recent additions), decommissioned device ids in a set: O(log n)
  and O(1) checks at every CONNECT.
- Every change is appended to the journal (:mod:`broker.revocation_journal`) as one line;
  the follower's position (with the feed's epoch and the last event's fingerprint) follows
  its batch, so a restart resumes from it instead of replaying the feed.
- **fsync policy**: a batch is written with one ``write(2)`` before the follower moves on
  (it survives a crash or SIGKILL of the broker: the page cache has it); the journal is
  fsynced from a worker thread at most ``fsync_s`` later (1 s by default). A power loss can
  cost the last second of appends, and the position is lost with them, so the follower reads
  those events again from the registry; only a local :meth:`RevokedSet.add` without a feed
  (``BrokerServer.revoke``) could be lost for good, and it is fsynced at once.
- **Compaction** runs in the background (``revoked-set-writer`` task): when the journal has
  outgrown the snapshot (or 1 MiB), a new snapshot is captured on the loop (the immutable
  buffer, the recent additions' dict handed over whole, a list copy of the device ids), the
  journal moves to a new generation at once, and the merge, the pruning of expired serials,
  the snapshot's write, fsync and rename and the removal of the journals it holds run on a
  worker thread; the loop then adopts the merged buffer (O(1)). The merge never holds the
  GIL in one C call that grows with the set (:meth:`SerialTable.merged`), so the loop's
  thread gets it back within the switch interval (5 ms).
- A write that fails (disk full, folder read-only or replaced) never stops enforcement: the
  set is already changed in memory, the failure is logged and counted, appends stop (a
  journal with a hole must not carry a later position), and the writer retries a whole
  snapshot with backoff until the disk is back.
- Revocation is permanent, except that a serial whose certificate has expired (not_after +
  :data:`fleetcore.profile.CLOCK_SKEW`) can no longer be presented and is forgotten on load
  and every ``prune_s``. Serials without a known not_after, and device ids, are kept for good.
- The JSON file of earlier versions (``revoked-<node>.json``, or the single-broker
  ``revoked.json``) is read once when no snapshot or journal exists; a snapshot is written at
  once and the node's old file renamed ``*.json.migrated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from broker.errors import RevocationStateError
from broker.revocation_journal import (
    Checkpoint,
    JournalFiles,
    SnapshotState,
    device_line,
    event_line,
    position_line,
    reset_line,
)
from broker.serial_table import Merge, SerialTable, expiry_code, key_hex, serial_key
from fleetcore.profile import CLOCK_SKEW

__all__ = ["EncodedSerials", "RevokedSet", "encode_serials"]

log = logging.getLogger(__name__)

#: A snapshot is due when the journal has grown past the snapshot's size, or this.
MIN_COMPACT_BYTES = 1 << 20
#: Recent additions are merged into the sorted buffer past this many (or 1/16 of the set).
MIN_MERGE_RECENT = 2048


def _limit(now: float | None = None) -> float:
    return (time.time() if now is None else now) - CLOCK_SKEW.total_seconds()


#: Serials ready for :meth:`RevokedSet.add_encoded`: (key, expiry code, lower-case hex).
EncodedSerials = list[tuple[bytes | None, int, str]]


def encode_serials(
    not_after: Iterable[tuple[str, dt.datetime]], seq: int, now: float | None = None
) -> tuple[EncodedSerials, bytes]:
    """Serials with their not_after, encoded for :meth:`RevokedSet.add_encoded` (a worker
    thread's job: the parsing :meth:`RevokedSet.add` does per serial on the loop), the
    expired ones (not_after + clock skew passed) left out, and their journal line."""
    limit = _limit(now)
    entries: EncodedSerials = []
    for serial, when in not_after:
        stamp = when.timestamp()
        if stamp < limit:
            continue
        hex_serial = serial.lower()
        entries.append((serial_key(hex_serial), expiry_code(stamp), hex_serial))
    line = event_line(seq, None, [(serial, code) for _, code, serial in entries])
    return entries, line


def _write_all(fd: int, data: bytes) -> None:
    """Append ``data`` to ``fd`` (every byte: os.write may take less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class RevokedSet:
    """Revoked serials and decommissioned devices, journaled in ``folder`` (None: memory only)."""

    def __init__(
        self,
        folder: Path | None,
        node: str = "broker",
        *,
        on_write: Callable[[bool], None] = lambda _ok: None,
        fsync_s: float = 1.0,
    ) -> None:
        self.folder = folder
        self.files = None if folder is None else JournalFiles(folder, f"revoked-{node}")
        self._migrate_from = (
            [] if folder is None else [folder / f"revoked-{node}.json", folder / "revoked.json"]
        )
        self.table = SerialTable()
        self.device_ids: set[str] = set()
        #: Highest feed sequence number applied (a metric; the position is what resumes).
        self.last_seq = 0
        #: The follower's persisted position in the feed, and the feed epoch it belongs to.
        self.position = 0
        self.epoch: int | None = None
        self.checkpoint: Checkpoint | None = None
        #: True while the disk lags behind memory (a write failed; retried).
        self.dirty = False
        #: Why the last write failed, while :attr:`dirty`.
        self.persist_error: str | None = None
        self.compactions = 0
        self._on_write = on_write
        self._fsync_s = fsync_s
        self._pending: list[bytes] = []
        self._fd: int | None = None
        self._generation = 1
        self._journal_bytes = 0
        self._snapshot_bytes = 0
        self._unsynced = False
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()

    # -- checks (RevocationView) ----------------------------------------------------------

    def is_serial_revoked(self, serial: str) -> bool:
        return serial.lower() in self.table

    def is_device_decommissioned(self, device_id: str) -> bool:
        return device_id in self.device_ids

    @property
    def serial_count(self) -> int:
        return len(self.table)

    def hex_serials(self) -> set[str]:
        """Every revoked serial as lower-case hex: O(n) strings, for tests and tools."""
        return self.table.hex_serials()

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
        it cannot be presented any more (a resync re-reads old events). The change is
        journaled by the next :meth:`save`.
        """
        expiry = {s.lower(): when.timestamp() for s, when in (not_after or {}).items()}
        limit = _limit()
        new, written = [], []
        for serial in (s.lower() for s in serials):
            when = expiry.get(serial)
            if when is not None and when < limit:
                continue
            if self.table.add(serial, when):
                new.append(serial)
            written.append((serial, expiry_code(when)))
        known_device = device_id is None or device_id in self.device_ids
        if device_id is not None:
            self.device_ids.add(device_id)
        if seq is not None and seq > self.last_seq:
            self.last_seq = seq
        if written or not known_device:
            self._pending.append(event_line(seq, device_id, written))
        return new

    def add_encoded(self, entries: EncodedSerials, journal_line: bytes, seq: int) -> list[str]:
        """:meth:`add` for serials encoded off the loop (:class:`EncodedSerials`, expired
        ones already left out) with their journal line (:func:`event_line` of ``seq``, no
        device): a snapshot's page; return the serials that were new."""
        add = self.table.add_key
        new = [serial for key, code, serial in entries if add(key, code, serial)]
        if seq > self.last_seq:
            self.last_seq = seq
        if entries:
            self._pending.append(journal_line)
        return new

    def add_devices(self, device_ids: Iterable[str], seq: int) -> list[str]:
        """Decommissioned devices (a snapshot's, no serials); return those that were new."""
        new = [device_id for device_id in device_ids if device_id not in self.device_ids]
        self.device_ids.update(new)
        if seq > self.last_seq:
            self.last_seq = seq
        self._pending.extend(device_line(seq, device_id) for device_id in new)
        return new

    def advance(self, position: int, epoch: int | None, checkpoint: Checkpoint | None) -> None:
        """The follower applied everything up to ``position`` (journaled by :meth:`save`)."""
        if (position, epoch, checkpoint) == (self.position, self.epoch, self.checkpoint):
            return
        self.position, self.epoch, self.checkpoint = position, epoch, checkpoint
        self._pending.append(position_line(position, epoch, checkpoint))

    def reset(self, epoch: int | None) -> None:
        """The follower starts over from 0 (in ``epoch``); every serial is kept."""
        self.position, self.epoch, self.checkpoint = 0, epoch, None
        self._pending.append(reset_line(epoch))

    def prune(self, now: float | None = None) -> list[str]:
        """Forget serials whose certificate expired more than CLOCK_SKEW ago, at once (O(n)
        on the calling thread: load and tests; the running broker prunes off the loop)."""
        limit = _limit(now)
        expired = self.table.drop_recent_expired(limit)
        buffer, recent, earliest = self.table.freeze()
        expired += self.table.adopt(SerialTable.merged(buffer, recent, limit, earliest))
        found = sorted(key_hex(key) for key in expired)
        if found:
            log.info("revoked set pruned expired=%d serials=%d", len(found), self.serial_count)
        return found

    # -- disk: append -----------------------------------------------------------------------

    def save(self, durable: bool = False, compact: bool = True) -> bool:
        """Append the pending lines with one write (``durable``: and fsync). False (logged,
        counted, retried as a snapshot by :meth:`keep_persisted`) when the disk refuses.
        Never raises: enforcement goes on. ``compact=False``: do not start a compaction yet
        (a snapshot's pages: the last page's save does)."""
        pending, self._pending = b"".join(self._pending), []
        if self.files is None or not pending:
            return not self.dirty
        if self.dirty:
            return False  # the retried snapshot will hold it: no journal with a hole
        try:
            fd = self._journal_fd()
            _write_all(fd, pending)
            if durable:
                os.fsync(fd)
        except OSError as exc:
            self._failed(exc)
            return False
        self._written(len(pending), durable, compact)
        return True

    async def save_off_loop(self) -> bool:
        """:meth:`save` (not durable, no compaction started) with the write(2) on a worker
        thread, for large appends (a snapshot page's): a disk whose writeback the kernel
        throttles blocks that thread, not the loop. Serialized with the compaction, which
        closes the journal; a cancelled caller waits for the write before it goes."""
        async with self._busy:
            pending, self._pending = b"".join(self._pending), []
            if self.files is None or not pending:
                return not self.dirty
            if self.dirty:
                return False
            try:
                fd = self._journal_fd()
                write = asyncio.ensure_future(asyncio.to_thread(_write_all, fd, pending))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    await asyncio.wait([write])  # the journal stays open until it is done
                    raise
            except OSError as exc:
                self._failed(exc)
                return False
            self._written(len(pending), False, False)
            return True

    def _journal_fd(self) -> int:
        """The open journal of this generation (opened, and its folder made, when needed)."""
        if self._fd is None:
            assert self.files is not None and self.folder is not None
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.files.journal_path(self._generation)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def _written(self, size: int, durable: bool, compact: bool) -> None:
        self._journal_bytes += size
        self._unsynced = not durable
        if compact and (self._journal_outgrown() or self._recent_outgrown()):
            self._wake.set()
        self._on_write(True)

    def _failed(self, exc: OSError) -> None:
        error = f"{type(exc).__name__}: {exc}"[:300]
        if not self.dirty:
            log.error(
                "revoked set not persisted folder=%s error=%s serials=%d "
                "(enforced in memory; retrying)",
                self.folder,
                error,
                self.serial_count,
            )
        self.dirty, self.persist_error = True, error
        self._close_journal()
        self._on_write(False)
        self._wake.set()

    def _close_journal(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- disk: load -------------------------------------------------------------------------

    def load(self) -> None:
        """Read the snapshot and journal (or migrate the JSON file of earlier versions);
        nothing on disk is an empty set, a damaged snapshot an error."""
        if self.files is None:
            return
        if self.files.exists():
            started = time.monotonic()
            state = self.files.load(_limit())
            self.table, self.device_ids = state.table, state.device_ids
            self.position, self.epoch, self.checkpoint = (
                state.position,
                state.epoch,
                state.checkpoint,
            )
            self.last_seq, self._generation = state.last_seq, state.generation
            self._journal_bytes = state.journal_bytes
            if self.files.snapshot_path.exists():
                self._snapshot_bytes = self.files.snapshot_path.stat().st_size
            log.info(
                "revoked set loaded folder=%s serials=%d devices=%d position=%d epoch=%s "
                "journal_bytes=%d load_s=%.3f",
                self.folder,
                self.serial_count,
                len(self.device_ids),
                self.position,
                self.epoch,
                self._journal_bytes,
                time.monotonic() - started,
            )
            return
        for source in self._migrate_from:
            if source.exists():
                self._migrate(source)
                return

    def _migrate(self, source: Path) -> None:
        """Read a JSON file of earlier versions once and write a snapshot of it."""
        try:
            body = json.loads(source.read_text())
            serials = [str(s).lower() for s in body["serials"]]
            device_ids = {str(d) for d in body.get("device_ids", [])}
            last_seq = int(body.get("last_seq", 0))
            not_after = {str(s).lower(): float(t) for s, t in body.get("not_after", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RevocationStateError(
                f"{source} is unreadable ({exc}); restore it from a backup or remove it to "
                "rebuild it from the registry feed (refuses nothing until the feed is read)"
            ) from None
        for serial in serials:
            self.table.add(serial, not_after.get(serial))
        self.device_ids |= device_ids
        # Earlier versions replayed the feed from 0 at every start: so does the first start
        # after the upgrade (position 0), once; the position is journaled from then on.
        self.last_seq = last_seq
        self.prune()
        try:
            self._write_snapshot_now()
        except OSError as exc:
            self._failed(exc)
            return
        if source.name != "revoked.json":  # the shared legacy file may serve other nodes
            source.rename(source.with_name(source.name + ".migrated"))
        log.info(
            "revoked set migrated from=%s to=%s serials=%d devices=%d",
            source,
            self.files.snapshot_path if self.files else None,
            self.serial_count,
            len(self.device_ids),
        )

    def _write_snapshot_now(self) -> None:
        assert self.files is not None
        snapshot = self._capture()
        merge = SerialTable.merged(snapshot.buffer, snapshot.recent, None, snapshot.earliest)
        self._adopted(merge, self.files.write_snapshot(snapshot, merge))

    # -- disk: compaction (background) ------------------------------------------------------

    def _capture(self) -> SnapshotState:
        """What the next snapshot holds; the journal moves to a new generation now."""
        self._close_journal()
        self._generation += 1
        buffer, recent, earliest = self.table.freeze()
        return SnapshotState(
            generation=self._generation,
            buffer=buffer,
            recent=recent,
            earliest=earliest,
            oversize=sorted(self.table.oversize),
            device_ids=list(self.device_ids),  # sorted by the writer, off the loop
            epoch=self.epoch,
            position=self.position,
            last_seq=self.last_seq,
            checkpoint=self.checkpoint,
        )

    def _adopted(self, merge: Merge, snapshot_bytes: int) -> list[bytes]:
        """A snapshot is on disk (and the journals it holds removed): swap its buffer in."""
        expired = self.table.adopt(merge)
        self._snapshot_bytes = snapshot_bytes
        self._journal_bytes = 0
        self.compactions += 1
        if self.dirty:
            log.info(
                "revoked set persisted again folder=%s serials=%d", self.folder, self.serial_count
            )
        self.dirty, self.persist_error = False, None
        self._on_write(True)
        return expired

    def _journal_outgrown(self) -> bool:
        return self._journal_bytes > max(MIN_COMPACT_BYTES, self._snapshot_bytes)

    def _recent_outgrown(self) -> bool:
        return len(self.table.recent) > max(MIN_MERGE_RECENT, self.serial_count // 16)

    async def compact(self, prune: bool = False, snapshot: bool = True) -> list[str]:
        """Merge the recent additions into the sorted buffer off the loop (``prune``: and
        drop expired serials; ``snapshot``: and write a snapshot, the journal starting a
        new generation); return the serials pruned. Raises OSError when the disk refuses."""
        async with self._busy:
            self.save()
            limit = _limit() if prune else None
            files = self.files
            if files is None or not snapshot:
                buffer, recent, earliest = self.table.freeze()
                merge = await asyncio.to_thread(SerialTable.merged, buffer, recent, limit, earliest)
                expired = self.table.adopt(merge)
            else:
                state = self._capture()

                def work() -> tuple[Merge, int]:
                    merge = SerialTable.merged(state.buffer, state.recent, limit, state.earliest)
                    return merge, files.write_snapshot(state, merge)

                merge, size = await asyncio.to_thread(work)
                expired = self._adopted(merge, size)
            if limit is not None:
                expired += self.table.drop_recent_expired(limit)
            return sorted(key_hex(key) for key in expired)

    async def keep_pruned(self, prune_s: float, on_pruned: Callable[[int], None]) -> None:
        """Every ``prune_s`` seconds, forget expired serials: the recent additions on the
        loop (a small dict), the sorted buffer by a merge off the loop, only when its
        earliest not_after has passed; forever. Memory only: a load prunes again."""
        while True:
            await asyncio.sleep(prune_s)
            limit = _limit()
            if self.table.may_have_expired(limit):
                expired = await self.compact(prune=True, snapshot=False)
            else:
                expired = [key_hex(key) for key in self.table.drop_recent_expired(limit)]
            if expired:
                log.info(
                    "revoked set pruned expired=%d serials=%d", len(expired), self.serial_count
                )
                on_pruned(len(expired))

    async def keep_persisted(self, min_backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        """The writer: fsync the journal within ``fsync_s``; merge the recent additions when
        they outgrow 1/16 of the set; write a snapshot when the journal outgrows the last one,
        or after a failed write (retried with backoff until the disk is back); forever."""
        backoff = min_backoff_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._fsync_s)
            except TimeoutError:
                await self._sync()
                continue
            self._wake.clear()
            while self.dirty or self._journal_outgrown() or self._recent_outgrown():
                try:
                    await self.compact(snapshot=self.dirty or self._journal_outgrown())
                    backoff = min_backoff_s
                except OSError as exc:
                    self._failed(exc)
                    self._wake.clear()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, max_backoff_s)

    async def _sync(self) -> None:
        if not self._unsynced or self._fd is None:
            return
        self._unsynced = False
        fd = os.dup(self._fd)  # the loop may close the journal meanwhile
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            self._failed(exc)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Write what is pending, fsync and close the journal (at stop)."""
        self.save(durable=True)
        self._close_journal()
