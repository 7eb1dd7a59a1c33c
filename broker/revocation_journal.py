"""The revoked set on disk: a snapshot plus an append-only journal (issue 23).

Files in ``<data>/broker/`` (``<node>`` is the broker node's name):

- ``revoked-<node>.snapshot``: written whole, fsynced, renamed into place (a crash leaves the
  old one or the new one). A first line ``certfleet-revoked-snapshot 1``, a JSON header line
  (journal generation, feed epoch and position, the last applied event's fingerprint, record
  and device counts, a CRC-32 of the rest), then the serial records exactly as
  :class:`broker.serial_table.SerialTable` holds them (24 bytes each, sorted), then the
  decommissioned device ids as one JSON line. Loading it is one read: no parsing per serial.
- ``revoked-<node>.<generation>.journal``: one JSON line per change, appended, never
  rewritten. ``{"seq", "d", "s"}`` an applied event (its sequence number, the device id when
  it was a decommission, ``[serial, not_after]`` pairs); ``{"pos", "epoch", "check"}`` the
  follower's position after a batch (and the last event's fingerprint); ``{"reset": epoch}``
  a resync from 0. The snapshot names the first generation it does not contain: the state is
  the snapshot plus every journal of that generation or later, replayed in order.

A crash in the middle of an append leaves a torn last line: it is dropped on load (and cut
off before the next append). Whatever it held was never acknowledged: the position line of
its batch comes after the batch's events, so the follower reads that batch again. A damaged
line anywhere else costs a resync from 0 (the position is reset), never a hole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from broker.errors import RevocationStateError
from broker.serial_table import RECORD, Merge, Records, SerialTable, expiry_code, serial_key
from fleetcore.layout import write_durable

__all__ = [
    "Checkpoint",
    "JournalFiles",
    "LoadedState",
    "SnapshotState",
    "event_line",
    "position_line",
    "reset_line",
]

log = logging.getLogger(__name__)

MAGIC: Final = b"certfleet-revoked-snapshot 1\n"


@dataclass(frozen=True)
class Checkpoint:
    """The last applied event: its sequence number and a digest of what it revoked, so a
    later check can ask the feed for that one event and compare (divergence detection)."""

    seq: int
    digest: str


@dataclass
class SnapshotState:
    """Everything a snapshot holds, captured on the loop, written on a thread."""

    generation: int
    buffer: Records
    recent: dict[bytes, int]
    earliest: int
    oversize: list[str]
    device_ids: list[str]
    epoch: int | None
    position: int
    last_seq: int
    checkpoint: Checkpoint | None


@dataclass
class LoadedState:
    """What loading the files found."""

    table: SerialTable = field(default_factory=SerialTable)
    device_ids: set[str] = field(default_factory=set)
    epoch: int | None = None
    position: int = 0
    last_seq: int = 0
    checkpoint: Checkpoint | None = None
    #: The journal generation to append to next.
    generation: int = 1
    #: Bytes of journal replayed (compaction is due when it outgrows the snapshot).
    journal_bytes: int = 0
    found: bool = False


def event_line(seq: int | None, device_id: str | None, serials: list[tuple[str, int]]) -> bytes:
    """A journal line for an applied event (``seq`` None: a local revocation)."""
    return _line({"seq": seq, "d": device_id, "s": serials})


def device_line(seq: int | None, device_id: str) -> bytes:
    """:func:`event_line` of a decommission without serials (the same bytes), without
    encoding a dict: a snapshot brings tens of thousands of them at a million devices."""
    number = b"null" if seq is None else str(seq).encode()
    return b'{"seq":%s,"d":%s,"s":[]}\n' % (number, json.dumps(device_id).encode())


def position_line(position: int, epoch: int | None, checkpoint: Checkpoint | None) -> bytes:
    check = None if checkpoint is None else [checkpoint.seq, checkpoint.digest]
    return _line({"pos": position, "epoch": epoch, "check": check})


def reset_line(epoch: int | None) -> bytes:
    return _line({"reset": epoch})


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


class JournalFiles:
    """Paths, loading and snapshot writing for one node's revoked set."""

    def __init__(self, folder: Path, node_file: str) -> None:
        self.folder = folder
        self.stem = node_file  # e.g. "revoked-broker"
        self.snapshot_path = folder / f"{node_file}.snapshot"
        self._journal_re = re.compile(rf"^{re.escape(node_file)}\.(\d+)\.journal$")

    def journal_path(self, generation: int) -> Path:
        return self.folder / f"{self.stem}.{generation}.journal"

    def journals(self) -> list[tuple[int, Path]]:
        """Journal files present, by generation."""
        try:
            names = os.listdir(self.folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = [
            (int(m.group(1)), self.folder / n) for n in names if (m := self._journal_re.match(n))
        ]
        return sorted(found)

    def exists(self) -> bool:
        return self.snapshot_path.exists() or bool(self.journals())

    # -- load ------------------------------------------------------------------------------

    def load(self, now_limit: float) -> LoadedState:
        """The snapshot plus the journals it does not contain; serials expired before
        ``now_limit`` are left out."""
        state = LoadedState()
        if self.snapshot_path.exists():
            self._read_snapshot(state)
            state.found = True
        recent: dict[bytes, int] = {}
        for generation, path in self.journals():
            if generation < state.generation:
                continue  # folded into the snapshot; removed after the next compaction
            state.found = True
            state.journal_bytes += self._replay(path, state, recent)
            state.generation = generation
        state.table.recent.update(recent)
        if recent or state.table.may_have_expired(now_limit):  # else the snapshot is as merged
            buffer, fresh, earliest = state.table.freeze()
            state.table.adopt(SerialTable.merged(buffer, fresh, now_limit, earliest))
        return state

    def _read_snapshot(self, state: LoadedState) -> None:
        path = self.snapshot_path
        try:
            data = path.read_bytes()
            if not data.startswith(MAGIC):
                raise ValueError("not a revoked-set snapshot")
            header_end = data.index(b"\n", len(MAGIC))
            header = json.loads(data[len(MAGIC) : header_end])
            body = memoryview(data)[header_end + 1 :]
            if zlib.crc32(body) != int(header["crc32"]):
                raise ValueError("checksum mismatch (truncated or damaged)")
            records = int(header["serials"]) * RECORD
            buffer = bytes(body[:records])
            device_ids = json.loads(bytes(body[records:]))
            state.table = SerialTable(buffer)
            state.table.earliest = int(header.get("earliest", 0))
            state.table.oversize.update(str(s) for s in header.get("oversize", []))
            state.device_ids.update(str(d) for d in device_ids)
            state.epoch = None if header["epoch"] is None else int(header["epoch"])
            state.position = int(header["position"])
            state.last_seq = int(header["last_seq"])
            check = header.get("check")
            state.checkpoint = None if check is None else Checkpoint(int(check[0]), str(check[1]))
            state.generation = int(header["generation"])
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise RevocationStateError(
                f"{path} is unreadable ({exc}); restore it from a backup or remove it (and "
                f"{self.stem}.*.journal) to rebuild the set from the registry feed"
            ) from None

    def _replay(self, path: Path, state: LoadedState, recent: dict[bytes, int]) -> int:
        """Apply one journal's lines; cut a torn last line off the file. Returns its size."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RevocationStateError(
                f"{path} is unreadable ({exc}); remove it to rebuild from the registry feed"
            ) from None
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning(
                "revoked journal torn last line dropped path=%s bytes=%d", path, len(data) - end
            )
            with path.open("r+b") as handle:
                handle.truncate(end)
        damaged = 0
        for raw in data[:end].splitlines():
            try:
                _apply_line(json.loads(raw), state, recent)
            except (ValueError, KeyError, TypeError, IndexError):
                damaged += 1
        if damaged:
            log.error(
                "revoked journal damaged lines=%d path=%s; resyncing the feed from 0 "
                "(nothing already revoked is forgotten)",
                damaged,
                path,
            )
            state.position, state.checkpoint = 0, None
        return end

    # -- write -----------------------------------------------------------------------------

    def write_snapshot(self, snapshot: SnapshotState, merge: Merge) -> int:
        """Write a snapshot of ``snapshot`` whose serials are ``merge``, then remove the
        journals it holds; returns its size. On a worker thread: the write, fsync, rename
        and unlinks, and no copy of the records (written as they are, the checksum
        computed piecewise). Raises OSError when the disk refuses."""
        devices = _json_list(snapshot.device_ids).encode() + b"\n"
        check = snapshot.checkpoint
        header = {
            "generation": snapshot.generation,
            "epoch": snapshot.epoch,
            "position": snapshot.position,
            "last_seq": snapshot.last_seq,
            "check": None if check is None else [check.seq, check.digest],
            "serials": len(merge.buffer) // RECORD,
            "earliest": merge.earliest,
            "device_ids": len(snapshot.device_ids),
            "oversize": sorted(snapshot.oversize),
            "crc32": zlib.crc32(devices, zlib.crc32(merge.buffer)),
        }
        parts: list[bytes | bytearray] = [
            MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n",
            merge.buffer,
            devices,
        ]
        write_durable(self.snapshot_path, parts, 0o644)
        self.remove_journals_before(snapshot.generation)
        return sum(len(part) for part in parts)

    def remove_journals_before(self, generation: int) -> None:
        for number, path in self.journals():
            if number < generation:
                path.unlink(missing_ok=True)


def _json_list(items: list[str], chunk: int = 4096) -> str:
    """``items`` as one JSON array, encoded ``chunk`` at a time (each ``json.dumps`` holds
    the GIL; 30,000 device ids in one call would hold it for milliseconds)."""
    parts = [json.dumps(items[i : i + chunk])[1:-1] for i in range(0, len(items), chunk)]
    return "[" + ",".join(parts) + "]"


def _apply_line(body: dict[str, Any], state: LoadedState, recent: dict[bytes, int]) -> None:
    if "s" in body:
        for serial, code in body["s"]:
            key = serial_key(str(serial))
            if key is None:
                state.table.oversize.add(str(serial))
            else:
                recent[key] = max(recent.get(key, 0), int(code))
        if body.get("d") is not None:
            state.device_ids.add(str(body["d"]))
        if body.get("seq") is not None:
            state.last_seq = max(state.last_seq, int(body["seq"]))
    elif "pos" in body:
        state.position = int(body["pos"])
        state.epoch = None if body["epoch"] is None else int(body["epoch"])
        check = body.get("check")
        state.checkpoint = None if check is None else Checkpoint(int(check[0]), str(check[1]))
    elif "reset" in body:
        state.position, state.checkpoint = 0, None
        state.epoch = None if body["reset"] is None else int(body["reset"])
    else:
        raise ValueError("unknown journal line")


def encode_serials(serials: list[str], not_after: dict[str, float]) -> list[tuple[str, int]]:
    """``[serial, not_after code]`` pairs of a journal event line."""
    return [(serial, expiry_code(not_after.get(serial))) for serial in serials]
