"""A compact table of revoked serials and their certificates' not_after (issue 23).

Each serial is one fixed record of :data:`RECORD` bytes: the serial as a 20-byte big-endian
integer (RFC 5280 caps serials at 20 octets) then its not_after as a 4-byte big-endian
count of POSIX seconds (:data:`FOREVER` when the feed did not say: kept for good). Records
live in one immutable ``bytes`` buffer sorted by serial (24 bytes a serial, looked up by
binary search), plus a small dict of recent additions that :meth:`SerialTable.merged`
folds into a new buffer. Because the buffer is never changed in place, a merge (and the
pruning of expired serials it does on the way) runs on a worker thread while the event loop
keeps reading the old buffer; :meth:`SerialTable.adopt` swaps the result in.

Big-endian records compare as bytes in the order of their numbers: the buffer sorts by
serial with ``bytes`` comparisons, and an expired record is one whose last 4 bytes are
below the limit's, with no integer conversion. A serial longer than 20 bytes (outside the
profile; never minted by our CA) is kept as hex in a plain set beside the table.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from fleetcore.profile import serial_hex

__all__ = [
    "FOREVER",
    "RECORD",
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

    buffer: bytes
    #: The recent additions folded in (leave the table's recent dict on adoption).
    folded: dict[bytes, int]
    #: Serials dropped because their certificate expired before the limit.
    expired: tuple[bytes, ...]
    #: The earliest not_after code left in the buffer (FOREVER when empty).
    earliest: int


class SerialTable:
    """Revoked serials with their not_after: a sorted record buffer plus recent additions."""

    def __init__(self, buffer: bytes = b"") -> None:
        if len(buffer) % RECORD:
            raise ValueError(f"record buffer length {len(buffer)} is not a multiple of {RECORD}")
        self._buffer = buffer
        self._count = len(buffer) // RECORD
        #: Added since the last merge: key -> not_after code.
        self.recent: dict[bytes, int] = {}
        #: Serials longer than 20 bytes, as hex (kept for good).
        self.oversize: set[str] = set()
        #: The earliest not_after code in the buffer (0: unknown, a prune pass finds out).
        self.earliest = 0 if buffer else FOREVER

    def __len__(self) -> int:
        return self._count + len(self.recent) + len(self.oversize)

    @property
    def buffer(self) -> bytes:
        return self._buffer

    def _find(self, key: bytes) -> int:
        """Index of ``key``'s record in the buffer, or -1."""
        buffer, count = self._buffer, self._count
        index = bisect.bisect_left(
            range(count), key, key=lambda i: buffer[i * RECORD : i * RECORD + SERIAL_BYTES]
        )
        if index < count and buffer[index * RECORD : index * RECORD + SERIAL_BYTES] == key:
            return index
        return -1

    def __contains__(self, serial_hex: str) -> bool:
        key = serial_key(serial_hex)
        if key is None:
            return serial_hex in self.oversize
        return key in self.recent or self._find(key) >= 0

    def add(self, serial_hex: str, not_after: float | None) -> bool:
        """Add a serial (or lengthen what is known of its expiry); True when it was new."""
        key = serial_key(serial_hex)
        if key is None:
            new = serial_hex not in self.oversize
            self.oversize.add(serial_hex)
            return new
        code = expiry_code(not_after)
        known = self.recent.get(key)
        if known is None:
            index = self._find(key)
            if index >= 0:
                start = index * RECORD + SERIAL_BYTES
                stored = int.from_bytes(self._buffer[start : start + 4], "big")
                if code > stored:  # a later not_after (or none): keep the longer one
                    self.recent[key] = code
                return False
            self.recent[key] = code
            return True
        self.recent[key] = max(known, code)
        return False

    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every (key, not_after code), buffer first (a key may show twice: recent wins)."""
        buffer = self._buffer
        for start in range(0, len(buffer), RECORD):
            yield (
                buffer[start : start + SERIAL_BYTES],
                int.from_bytes(buffer[start + SERIAL_BYTES : start + RECORD], "big"),
            )
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
        if key in self.recent:
            return self.recent[key]
        index = self._find(key)
        if index < 0:
            return None
        start = index * RECORD + SERIAL_BYTES
        return int.from_bytes(self._buffer[start : start + 4], "big")

    def snapshot(self) -> tuple[bytes, dict[bytes, int], int]:
        """What a merge works from: the (immutable) buffer, a copy of the recent dict, and
        the buffer's earliest not_after code."""
        return self._buffer, dict(self.recent), self.earliest

    @staticmethod
    def merged(
        buffer: bytes, recent: dict[bytes, int], limit: float | None, earliest: int = 0
    ) -> Merge:
        """A sorted buffer of ``buffer`` and ``recent``, without records expired before
        ``limit`` (POSIX seconds; None: keep all). Pure: safe on a worker thread.

        Built from slices of the old buffer around the recent keys (found by binary
        search), then joined once: no single C call sorts or walks the whole set while
        holding the GIL, so the event loop's thread gets it back within the switch
        interval. Without ``limit`` the cost is O(recent log n) plus one copy."""
        count = len(buffer) // RECORD

        def key_at(index: int) -> bytes:
            return buffer[index * RECORD : index * RECORD + SERIAL_BYTES]

        pieces: list[bytes] = []
        at = 0  # the first record of ``buffer`` not yet emitted
        for key in sorted(recent):
            index = bisect.bisect_left(range(count), key, lo=at, key=key_at)
            pieces.append(buffer[at * RECORD : index * RECORD])
            code = recent[key]
            if index < count and key_at(index) == key:  # known: keep the later not_after
                stored = buffer[index * RECORD + SERIAL_BYTES : (index + 1) * RECORD]
                code = max(code, int.from_bytes(stored, "big"))
                index += 1
            pieces.append(key + code.to_bytes(4, "big"))
            at = index
        pieces.append(buffer[at * RECORD :])
        joined = b"".join(pieces)
        if limit is None:
            low = min(earliest, min(recent.values(), default=FOREVER))
            return Merge(joined, recent, (), low)
        return SerialTable._pruned(joined, recent, expiry_code(limit))

    @staticmethod
    def _pruned(buffer: bytes, recent: dict[bytes, int], floor: int) -> Merge:
        """``buffer`` without records whose not_after code is below ``floor`` (one pass)."""
        view = memoryview(buffer)
        kept: list[bytes] = []
        expired: list[bytes] = []
        low, run = FOREVER, 0
        for index in range(len(buffer) // RECORD):
            start = index * RECORD
            code = int.from_bytes(view[start + SERIAL_BYTES : start + RECORD], "big")
            if code < floor:
                kept.append(buffer[run * RECORD : start])
                expired.append(buffer[start : start + SERIAL_BYTES])
                run = index + 1
            elif code < low:
                low = code
        if not expired:
            return Merge(buffer, recent, (), low)
        kept.append(buffer[run * RECORD :])
        return Merge(b"".join(kept), recent, tuple(expired), low)

    def adopt(self, merge: Merge) -> list[bytes]:
        """Swap in a merge built from this table; return the keys that expired in it.

        Keys added to ``recent`` after the merge's snapshot stay in ``recent``; a folded
        key whose expiry was lengthened meanwhile stays too (the later value wins). The dict
        is rebuilt, not emptied in place: a dict keeps the table of its largest size."""
        self._buffer = merge.buffer
        self._count = len(merge.buffer) // RECORD
        self.earliest = merge.earliest
        folded = merge.folded
        self.recent = {k: v for k, v in self.recent.items() if folded.get(k) != v}
        # An expired key re-added meanwhile (not possible for an expired certificate in
        # practice) is still in recent and stays revoked.
        return [key for key in merge.expired if key not in self.recent]

    def may_have_expired(self, limit: float) -> bool:
        """Whether the buffer may hold a serial expired before ``limit`` (a merge finds it)."""
        return self.earliest < expiry_code(limit)

    def drop_recent_expired(self, limit: float) -> list[bytes]:
        """Forget recent additions expired before ``limit``; return their keys."""
        floor = expiry_code(limit)
        expired = [key for key, code in self.recent.items() if code < floor]
        for key in expired:
            del self.recent[key]
        return expired

    @classmethod
    def from_items(cls, items: Iterable[tuple[bytes, int]]) -> SerialTable:
        """A table holding ``items`` in its buffer (load: one sort, no recent dict)."""
        table = cls()
        merge = cls.merged(b"", dict(items), None, FOREVER)
        table.adopt(merge)
        return table


def key_hex(key: bytes) -> str:
    """A 20-byte key -> the serial's lower-case hex."""
    return serial_hex(int.from_bytes(key, "big"))
