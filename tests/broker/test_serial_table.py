"""The revoked serials' table (issue 23): merges against a plain dict as the reference, at
sizes that cross the sparse index's strides, the sort runs and the copy pieces; the count
with lengthened expiries; freeze and adopt while additions go on."""

from __future__ import annotations

import random

import pytest

from broker import serial_table
from broker.serial_table import FOREVER, RECORD, SerialTable, key_hex


def _keys(rng: random.Random, count: int) -> list[bytes]:
    return [rng.getrandbits(159).to_bytes(20, "big") for _ in range(count)]


def _table(reference: dict[bytes, int]) -> SerialTable:
    return SerialTable.from_items(reference.items())


def _contents(table: SerialTable) -> dict[bytes, int]:
    found: dict[bytes, int] = {}
    for key, code in table.items():  # a later layer wins
        found[key] = code
    return found


@pytest.mark.parametrize(("size", "added"), [(0, 50), (5, 1), (1000, 300), (20_000, 9_000)])
def test_a_merge_equals_the_reference(
    size: int, added: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pieces and runs, so that every boundary is crossed at a test's size.
    monkeypatch.setattr(serial_table, "COPY_BYTES", 5 * RECORD)
    monkeypatch.setattr(serial_table, "SORT_CHUNK", 64)
    rng = random.Random(size)
    reference = {key: rng.randrange(1, 2**31) for key in _keys(rng, size)}
    table = _table(reference)
    fresh = {key: rng.randrange(1, 2**31) for key in _keys(rng, added)}
    known = rng.sample(sorted(reference), min(len(reference), added // 3))
    lengthened = {key: reference[key] + 1 for key in known[: len(known) // 2]}
    shortened = {key: reference[key] - 1 for key in known[len(known) // 2 :]}
    for key, code in {**fresh, **lengthened, **shortened}.items():
        table.add(key_hex(key), float(code))
    for key, code in fresh.items():
        reference[key] = code
    reference.update(lengthened)  # a shorter expiry never replaces a longer one
    assert len(table) == len(reference)  # the lengthened ones are not counted twice
    buffer, frozen, earliest = table.freeze()
    merge = SerialTable.merged(buffer, frozen, None, earliest)
    table.adopt(merge)
    assert table.recent == {} and table.frozen == {}
    records = bytes(table.buffer)
    keys = [records[i : i + 20] for i in range(0, len(records), RECORD)]
    assert keys == sorted(reference)
    assert _contents(table) == reference
    assert len(table) == len(reference)
    assert merge.earliest == min(reference.values(), default=FOREVER)


def test_a_pruning_merge_drops_exactly_the_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial_table, "SCAN_RECORDS", 16)
    monkeypatch.setattr(serial_table, "COPY_BYTES", 7 * RECORD)
    rng = random.Random(3)
    reference = {key: rng.randrange(1000, 2000) for key in _keys(rng, 3000)}
    table = _table(reference)
    recent = {key: rng.randrange(1000, 2000) for key in _keys(rng, 200)}
    for key, code in recent.items():
        table.add(key_hex(key), float(code))
    reference.update(recent)
    buffer, frozen, earliest = table.freeze()
    gone = table.adopt(SerialTable.merged(buffer, frozen, 1500.0, earliest))
    expired = {key for key, code in reference.items() if code < 1500}
    assert set(gone) == expired and len(gone) == len(expired)
    assert _contents(table) == {k: c for k, c in reference.items() if k not in expired}
    assert table.earliest == min(c for c in reference.values() if c >= 1500)
    assert len(table) == len(reference) - len(expired)


def test_additions_during_a_merge_stay_and_win() -> None:
    """freeze hands the recent additions to the merge; what is added before adopt (new
    serials, a longer expiry of a frozen one) stays in the new recent dict, counted once."""
    rng = random.Random(5)
    table = _table({key: 100 for key in _keys(rng, 500)})
    first = _keys(rng, 50)
    for key in first:
        table.add(key_hex(key), 200.0)
    buffer, frozen, earliest = table.freeze()
    assert table.recent == {} and set(frozen) == set(first)
    later = _keys(rng, 20)
    for key in later:
        assert table.add(key_hex(key), 300.0)
    assert not table.add(key_hex(first[0]), 400.0)  # lengthens a frozen one
    assert len(table) == 570
    table.adopt(SerialTable.merged(buffer, frozen, None, earliest))
    assert len(table) == 570
    assert table.expiry_of(key_hex(first[0])) == 400
    assert table.expiry_of(key_hex(first[1])) == 200
    assert all(key_hex(key) in table for key in first + later)
    assert set(table.recent) == set(later) | {first[0]}


def test_a_merge_that_was_never_adopted_is_folded_into_the_next() -> None:
    """A snapshot's write failed: its frozen additions are merged by the next compaction."""
    rng = random.Random(9)
    table = _table({key: 100 for key in _keys(rng, 100)})
    first, second = _keys(rng, 10), _keys(rng, 10)
    for key in first:
        table.add(key_hex(key), 200.0)
    table.freeze()  # its merge fails: never adopted
    for key in second:
        table.add(key_hex(key), 200.0)
    table.add(key_hex(first[0]), 300.0)
    assert len(table) == 120
    buffer, frozen, earliest = table.freeze()
    assert set(frozen) == set(first) | set(second) and frozen[first[0]] == 300
    assert len(table) == 120
    table.adopt(SerialTable.merged(buffer, frozen, None, earliest))
    assert len(table) == 120 and len(table.buffer) == 120 * RECORD
