"""A compact table of revoked serials and their certificates' not_after (issue 23).

Each serial is one fixed record of :data:`RECORD` bytes: the serial as a 20-byte big-endian
integer (RFC 5280 caps serials at 20 octets) then its not_after as a 4-byte big-endian
count of POSIX seconds (:data:`FOREVER` when the feed did not say: kept for good). Records
live in one immutable ``bytes`` buffer sorted by serial (24 bytes a serial, looked up by
binary search), plus a small dict of recent additions that :meth:`SerialTable.merged`
folds into a new buffer. Because the buffer is never changed in place, a merge (and the
pruning of expired serials it does on the way) runs on a worker thread while the event loop
keeps reading the old buffer; :meth:`SerialTable.freeze` hands the recent dict to the merge
(new additions go to a fresh one) and :meth:`SerialTable.adopt` swaps the result in, both
O(1) on the loop. The merge itself never holds the GIL for long (sorted runs, a sparse
index, windows of codes): the loop's thread gets it back within the switch interval.

Big-endian records compare as bytes in the order of their numbers: the buffer sorts by
serial with ``bytes`` comparisons, and an expired record is one whose last 4 bytes are
below the limit's, with no integer conversion. A serial longer than 20 bytes (outside the
profile; never minted by our CA) is kept as hex in a plain set beside the table.
"""

from __future__ import annotations

import bisect
import heapq
import operator
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from fleetcore.profile import serial_hex

__all__ = [
    "FOREVER",
    "RECORD",
    "Records",
    "SERIAL_BYTES",
    "Merge",
    "SerialTable",
    "expiry_code",
    "key_hex",
    "serial_key",
]

SERIAL_BYTES: Final = 20
RECORD: Final = SERIAL_BYTES + 4
#: not_after of a serial the feed gave none for: never expires.
FOREVER: Final = 0xFFFFFFFF
#: A merge looks a key up in every STRIDE-th key of the buffer first, then within its stride.
STRIDE: Final = 32
#: Keys sorted per C call during a merge (``sorted`` holds the GIL: ~1 ms per 4,096).
SORT_CHUNK: Final = 4096
#: Records whose not_after a pruning pass reads per C call.
SCAN_RECORDS: Final = 4096
#: Bytes copied per C call when a merge fills its new buffer.
COPY_BYTES: Final = 1 << 18
#: A record's not_after code (the serial skipped), and its key (the code skipped).
_CODES: Final = struct.Struct(f">{SERIAL_BYTES}xI")
_KEYS: Final = struct.Struct(f"{SERIAL_BYTES}s4x")
_first = operator.itemgetter(0)

#: A record buffer: ``bytes``, or the ``bytearray`` a merge filled (never changed after).
Records = bytes | bytearray


def serial_key(serial_hex: str) -> bytes | None:
    """A serial's lower-case hex -> its 20-byte key; None when it does not fit (or is not hex)."""
    try:
        value = int(serial_hex, 16)
    except ValueError:
        return None
    if value < 0 or value.bit_length() > SERIAL_BYTES * 8:
        return None
    return value.to_bytes(SERIAL_BYTES, "big")


def expiry_code(not_after: float | None) -> int:
    """A not_after (POSIX seconds, None = unknown) -> the 4-byte field's value."""
    if not_after is None:
        return FOREVER
    return max(0, min(int(not_after), FOREVER - 1))


@dataclass(frozen=True)
class Merge:
    """A merged buffer, built off the loop from a table's state at one moment."""

    buffer: Records
    #: Serials dropped because their certificate expired before the limit.
    expired: tuple[bytes, ...]
    #: The earliest not_after code left in the buffer (FOREVER when empty).
    earliest: int


class SerialTable:
    """Revoked serials with their not_after: a sorted record buffer, the additions a running
    merge is folding in (:attr:`frozen`), and the additions since (:attr:`recent`).

    A lookup tries ``recent``, then ``frozen``, then the buffer; a key in an upper layer
    holds the longest not_after known (an upper layer wins). One merge at a time:
    :meth:`freeze` hands the recent additions to it, :meth:`adopt` swaps its result in.
    Both are O(1) on the caller's thread (the loop), whatever the sizes.
    """

    def __init__(self, buffer: Records = b"") -> None:
        if len(buffer) % RECORD:
            raise ValueError(f"record buffer length {len(buffer)} is not a multiple of {RECORD}")
        self._buffer = buffer
        self._count = len(buffer) // RECORD
        #: Added since the last :meth:`freeze`: key -> not_after code.
        self.recent: dict[bytes, int] = {}
        #: Handed to the merge running now (never changed until :meth:`adopt` drops it).
        self.frozen: dict[bytes, int] = {}
        # Keys counted twice: of ``recent`` also in a lower layer (a lengthened expiry),
        # of ``frozen`` also in the buffer. Kept so that len() stays exact.
        self._shadow_recent = 0
        self._shadow_frozen = 0
        #: Serials longer than 20 bytes, as hex (kept for good).
        self.oversize: set[str] = set()
        #: The earliest not_after code in the buffer (0: unknown, a prune pass finds out).
        self.earliest = 0 if buffer else FOREVER

    def __len__(self) -> int:
        layered = len(self.frozen) + len(self.recent) - self._shadow_frozen - self._shadow_recent
        return self._count + layered + len(self.oversize)

    @property
    def buffer(self) -> Records:
        return self._buffer

    def _find(self, key: bytes) -> int:
        """Index of ``key``'s record in the buffer, or -1."""
        buffer, count = self._buffer, self._count
        probe: Records = key
        index = bisect.bisect_left(
            range(count), probe, key=lambda i: buffer[i * RECORD : i * RECORD + SERIAL_BYTES]
        )
        if index < count and buffer[index * RECORD : index * RECORD + SERIAL_BYTES] == key:
            return index
        return -1

    def _stored(self, key: bytes) -> int | None:
        """``key``'s not_after code below ``recent`` (frozen, else the buffer), or None."""
        code = self.frozen.get(key)
        if code is not None:
            return code
        index = self._find(key)
        if index < 0:
            return None
        start = index * RECORD + SERIAL_BYTES
        return int.from_bytes(self._buffer[start : start + 4], "big")

    def __contains__(self, serial_hex: str) -> bool:
        key = serial_key(serial_hex)
        if key is None:
            return serial_hex in self.oversize
        return key in self.recent or key in self.frozen or self._find(key) >= 0

    def add(self, serial_hex: str, not_after: float | None) -> bool:
        """Add a serial (or lengthen what is known of its expiry); True when it was new."""
        return self.add_key(serial_key(serial_hex), expiry_code(not_after), serial_hex)

    def add_key(self, key: bytes | None, code: int, serial_hex: str) -> bool:
        """:meth:`add` with the serial's key (:func:`serial_key`, None: oversize) and
        expiry code already made (off the loop: a snapshot's pages)."""
        if key is None:
            new = serial_hex not in self.oversize
            self.oversize.add(serial_hex)
            return new
        known = self.recent.get(key)
        if known is not None:
            self.recent[key] = max(known, code)
            return False
        stored = self._stored(key)
        if stored is None:
            self.recent[key] = code
            return True
        if code > stored:  # a later not_after (or none): keep the longer one
            self.recent[key] = code
            self._shadow_recent += 1
        return False

    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every (key, not_after code), buffer first (a key may show again in a later layer,
        which wins)."""
        buffer = self._buffer
        for start in range(0, len(buffer), RECORD):
            yield (
                bytes(buffer[start : start + SERIAL_BYTES]),
                int.from_bytes(buffer[start + SERIAL_BYTES : start + RECORD], "big"),
            )
        yield from self.frozen.items()
        yield from self.recent.items()

    def hex_serials(self) -> set[str]:
        """Every serial as lower-case hex (tests, small sets: O(n) strings)."""
        found = {key_hex(key) for key, _ in self.items()}
        return found | self.oversize

    def expiry_of(self, serial_hex: str) -> int | None:
        """The not_after code stored for a serial (None: not in the table)."""
        key = serial_key(serial_hex)
        if key is None:
            return FOREVER if serial_hex in self.oversize else None
        code = self.recent.get(key)
        return code if code is not None else self._stored(key)

    def freeze(self) -> tuple[Records, dict[bytes, int], int]:
        """Hand the recent additions to a merge: they become :attr:`frozen` and ``recent``
        starts empty. Returns what the merge works from: the (immutable) buffer, the frozen
        additions (never changed until :meth:`adopt`) and the buffer's earliest not_after
        code. O(1); after a merge that was never adopted (its write failed), the recent
        additions are folded into its frozen ones (O(recent), once)."""
        if self.frozen:
            total = len(self) - len(self.oversize)
            frozen = dict(self.frozen)
            for key, code in self.recent.items():
                if code > frozen.get(key, -1):
                    frozen[key] = code
            self.frozen, self._shadow_frozen = frozen, self._count + len(frozen) - total
        else:
            self.frozen, self._shadow_frozen = self.recent, self._shadow_recent
        self.recent, self._shadow_recent = {}, 0
        return self._buffer, self.frozen, self.earliest

    @staticmethod
    def merged(
        buffer: Records, recent: dict[bytes, int], limit: float | None, earliest: int = 0
    ) -> Merge:
        """A sorted buffer of ``buffer`` and ``recent``, without records expired before
        ``limit`` (POSIX seconds; None: keep all). Pure: safe on a worker thread.

        Made so that no single C call holding the GIL grows with the set: the keys are
        sorted in runs of :data:`SORT_CHUNK` and merged by a Python generator; each key's
        place is found in a sparse index (every :data:`STRIDE`-th key) then among its
        stride's keys (C bisects both); the result is a new buffer filled by copies of at
        most :data:`COPY_BYTES` (a fresh 12 MB buffer costs ~20 ms of page faults: in one
        ``join`` the loop would wait for all of them). Without ``limit`` the cost is
        O(recent log n + n / STRIDE) Python steps plus one copy of the buffer."""
        count = len(buffer) // RECORD
        view = memoryview(buffer)
        sparse = [
            bytes(view[start : start + SERIAL_BYTES])
            for start in range(0, len(buffer), STRIDE * RECORD)
        ]
        # Pass 1: each key's index in the old buffer, its record, whether it replaces one.
        places: list[tuple[int, bytes, bool]] = []
        at, window_start, window = 0, -1, []  # the stride's keys last read
        for key in _sorted_keys(recent):
            slot = bisect.bisect_right(sparse, key)
            start = max(0, slot - 1) * STRIDE
            if start != window_start:
                end = min(count, start + STRIDE) * RECORD
                window = list(map(_first, _KEYS.iter_unpack(view[start * RECORD : end])))
                window_start = start
            offset = bisect.bisect_left(window, key)
            index = max(at, start + offset)
            code = recent[key]
            known = offset < len(window) and window[offset] == key
            if known:  # keep the later not_after
                stored = view[index * RECORD + SERIAL_BYTES : (index + 1) * RECORD]
                code = max(code, int.from_bytes(stored, "big"))
            places.append((index, key + code.to_bytes(4, "big"), known))
            at = index + 1 if known else index
        if not places:
            joined: Records = buffer
        else:
            added = sum(1 for _, _, known in places if not known)
            out = bytearray((count + added) * RECORD)
            at = pos = 0
            for index, record, known in places:
                pos = _copy(out, pos, view, at * RECORD, index * RECORD)
                out[pos : pos + RECORD] = record
                pos += RECORD
                at = index + 1 if known else index
            _copy(out, pos, view, at * RECORD, len(buffer))
            joined = out
        if limit is None:
            low_code = min(earliest, min(recent.values(), default=FOREVER))
            return Merge(joined, (), low_code)
        return SerialTable._pruned(joined, expiry_code(limit))

    @staticmethod
    def _pruned(buffer: Records, floor: int) -> Merge:
        """``buffer`` without records whose not_after code is below ``floor``: the codes
        read :data:`SCAN_RECORDS` at a time (one C call each), a window walked record by
        record only when it holds an expired one."""
        view = memoryview(buffer)
        expired: list[int] = []
        low = FOREVER
        step = SCAN_RECORDS * RECORD
        for base in range(0, len(buffer), step):
            codes = list(map(_first, _CODES.iter_unpack(view[base : base + step])))
            smallest = min(codes)
            if smallest >= floor:
                low = min(low, smallest)
                continue
            first = base // RECORD
            for offset, code in enumerate(codes):
                if code < floor:
                    expired.append(first + offset)
                elif code < low:
                    low = code
        if not expired:
            return Merge(buffer, (), low)
        out = bytearray(len(buffer) - len(expired) * RECORD)
        pos = run = 0  # run: the first record not yet copied
        for index in expired:
            pos = _copy(out, pos, view, run * RECORD, index * RECORD)
            run = index + 1
        _copy(out, pos, view, run * RECORD, len(buffer))
        keys = tuple(bytes(view[i * RECORD : i * RECORD + SERIAL_BYTES]) for i in expired)
        return Merge(out, keys, low)

    def adopt(self, merge: Merge) -> list[bytes]:
        """Swap in the merge of this table's buffer and :attr:`frozen`; return the keys that
        expired in it. O(expired): ``recent`` (added meanwhile) stays as it is, and wins
        over the merged buffer where both hold a key."""
        self._buffer = merge.buffer
        self._count = len(merge.buffer) // RECORD
        self.earliest = merge.earliest
        self.frozen, self._shadow_frozen = {}, 0
        gone = []
        recent = self.recent
        for key in merge.expired:
            if key in recent:  # re-added meanwhile (an expired certificate: not in practice)
                self._shadow_recent -= 1  # it no longer shadows a record: it is the only one
            else:
                gone.append(key)
        return gone

    def may_have_expired(self, limit: float) -> bool:
        """Whether the buffer may hold a serial expired before ``limit`` (a merge finds it)."""
        return self.earliest < expiry_code(limit)

    def drop_recent_expired(self, limit: float) -> list[bytes]:
        """Forget recent additions expired before ``limit``; return their keys (a record of
        the same key below leaves at the next pruning merge)."""
        floor = expiry_code(limit)
        expired = [key for key, code in self.recent.items() if code < floor]
        for key in expired:
            del self.recent[key]
            if self._stored(key) is not None:
                self._shadow_recent -= 1
        return expired

    @classmethod
    def from_items(cls, items: Iterable[tuple[bytes, int]]) -> SerialTable:
        """A table holding ``items`` in its buffer (load: one sort, no recent dict)."""
        table = cls()
        merge = cls.merged(b"", dict(items), None, FOREVER)
        table.adopt(merge)
        return table


def _copy(out: bytearray, pos: int, view: memoryview, start: int, end: int) -> int:
    """Copy ``view[start:end]`` into ``out`` at ``pos`` in pieces of at most
    :data:`COPY_BYTES` (each a short C call); returns the position after it."""
    while start < end:
        size = min(end - start, COPY_BYTES)
        out[pos : pos + size] = view[start : start + size]
        pos, start = pos + size, start + size
    return pos


def _sorted_keys(keys: Iterable[bytes]) -> Iterator[bytes]:
    """``keys`` in order, sorted :data:`SORT_CHUNK` at a time (each ``sorted`` is one C call
    holding the GIL: ~1 ms) and merged by :func:`heapq.merge` (Python: lets the loop in)."""
    found = list(keys)
    if len(found) <= SORT_CHUNK:
        return iter(sorted(found))
    runs = [sorted(found[i : i + SORT_CHUNK]) for i in range(0, len(found), SORT_CHUNK)]
    return heapq.merge(*runs)


def key_hex(key: bytes) -> str:
    """A 20-byte key -> the serial's lower-case hex."""
    return serial_hex(int.from_bytes(key, "big"))
