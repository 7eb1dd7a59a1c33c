"""The revoked set's journal and snapshot (issue 23): replay, compaction off the loop, a torn
last line, a damaged line, the position and checkpoint, migration, memory per serial."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from broker.revocation_journal import Checkpoint, device_line, event_line
from broker.revoked_set import RevokedSet, encode_serials
from fleetcore.profile import CLOCK_SKEW, serial_hex

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)


def _serials(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [serial_hex(rng.getrandbits(159) | 1) for _ in range(count)]


def _fill(revoked: RevokedSet, serials: list[str], batch: int = 100, start_seq: int = 0) -> int:
    """Apply ``serials`` as superseded events in batches, as the follower does; last seq."""
    seq = start_seq
    for index in range(0, len(serials), batch):
        for serial in serials[index : index + batch]:
            seq += 1
            revoked.add([serial], None, seq, {serial: LATER})
        revoked.advance(seq, 42, Checkpoint(seq, f"digest-{seq}"))
        assert revoked.save()
    return seq


def _reloaded(folder: Path) -> RevokedSet:
    again = RevokedSet(folder)
    again.load()
    return again


def test_a_restart_replays_the_journal_to_the_same_set_and_position(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    serials = _serials(500)
    last = _fill(revoked, serials)
    revoked.add([], "dev-gone", last + 1)
    revoked.advance(last + 1, 42, Checkpoint(last + 1, "decommission"))
    revoked.save()
    assert not (tmp_path / "revoked-broker.snapshot").exists()  # journal only so far
    again = _reloaded(tmp_path)
    assert again.hex_serials() == set(serials)
    assert again.is_device_decommissioned("dev-gone")
    assert (again.position, again.epoch) == (last + 1, 42)
    assert again.checkpoint == Checkpoint(last + 1, "decommission")
    assert all(again.is_serial_revoked(s) for s in serials[:50])
    assert not again.is_serial_revoked(serial_hex(12345))


def test_a_snapshot_s_serials_and_devices_are_journaled_and_replayed(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).replace(microsecond=0)
    serials = _serials(300)
    entries, line = encode_serials([(s.upper(), later) for s in serials], 77)
    assert revoked.add_encoded(entries, line, 77) == serials  # lower-cased, all new
    assert revoked.add_devices(['dev-"quoted"', "dev-é"], 77) == ['dev-"quoted"', "dev-é"]
    revoked.save()
    again = _reloaded(tmp_path)
    assert again.hex_serials() == set(serials) and again.last_seq == 77
    assert again.table.expiry_of(serials[0]) == int(later.timestamp())
    assert all(again.is_device_decommissioned(d) for d in ('dev-"quoted"', "dev-é"))
    # the device line is the bytes the general event line would be
    assert device_line(77, "dev-é") == event_line(77, "dev-é", [])
    assert device_line(None, "x") == event_line(None, "x", [])


def test_a_page_written_from_a_worker_thread_is_journaled_and_a_refusing_disk_is_reported(
    tmp_path: Path,
) -> None:
    """save_off_loop (a snapshot page's write off the loop) appends what save would; a
    folder the journal cannot be made in is the same failure save reports (dirty, False)."""
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).replace(microsecond=0)
    serials = _serials(2000)

    async def pages(revoked: RevokedSet) -> list[bool]:
        written = []
        for start in range(0, len(serials), 500):
            entries, line = encode_serials([(s, later) for s in serials[start : start + 500]], 5)
            revoked.add_encoded(entries, line, 5)
            written.append(await revoked.save_off_loop())
        revoked.add_devices(["dev-page"], 5)
        written.append(await revoked.save_off_loop())
        return written

    revoked = RevokedSet(tmp_path)
    assert asyncio.run(pages(revoked)) == [True] * 5
    assert not revoked.dirty
    again = _reloaded(tmp_path)
    assert again.hex_serials() == set(serials) and again.is_device_decommissioned("dev-page")

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    refused = RevokedSet(blocked / "state")
    assert asyncio.run(pages(refused))[0] is False
    assert refused.dirty and refused.persist_error
    assert refused.is_serial_revoked(serials[0])  # enforced in memory all the same


def test_compaction_writes_a_snapshot_and_drops_the_journal_it_holds(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    first, second = _serials(3000, seed=1), _serials(200, seed=2)
    last = _fill(revoked, first)

    async def compact_while_adding() -> None:
        compaction = asyncio.create_task(revoked.compact())
        await asyncio.sleep(0)  # the compaction captured its state; its thread runs now
        _fill(revoked, second, start_seq=last)  # appended to the next generation meanwhile
        await compaction

    asyncio.run(compact_while_adding())
    journals = sorted(p.name for p in tmp_path.glob("revoked-broker.*.journal"))
    assert journals == ["revoked-broker.2.journal"]  # generation 1 is in the snapshot
    assert (tmp_path / "revoked-broker.snapshot").exists()
    assert revoked.compactions == 1 and len(revoked.table.recent) == len(second)
    again = _reloaded(tmp_path)
    assert again.hex_serials() == set(first) | set(second)
    assert again.position == last + len(second)


def test_a_torn_last_line_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A crash in the middle of an append: the batch whose write was torn was never
    acknowledged (its position line is after its events), so the follower reads it again."""
    revoked = RevokedSet(tmp_path)
    acknowledged = _serials(300)
    last = _fill(revoked, acknowledged)
    journal = tmp_path / "revoked-broker.1.journal"
    whole = journal.read_bytes()
    torn = json.dumps({"seq": last + 1, "d": None, "s": [["abc", 1]]}).encode()
    journal.write_bytes(whole + torn[: len(torn) // 2])  # the crash: half a line

    again = _reloaded(tmp_path)
    assert again.hex_serials() == set(acknowledged)
    assert again.position == last  # resumes before the torn batch: it is read again
    assert journal.read_bytes() == whole  # cut off, so the next append starts a clean line
    more = _serials(10, seed=9)
    _fill(again, more, start_seq=last)
    assert _reloaded(tmp_path).hex_serials() == set(acknowledged) | set(more)


def test_a_damaged_line_costs_a_resync_never_a_hole(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    serials = _serials(300)
    _fill(revoked, serials)
    journal = tmp_path / "revoked-broker.1.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[5] = b"{not json\n"
    journal.write_bytes(b"".join(lines))
    again = _reloaded(tmp_path)
    assert again.position == 0 and again.checkpoint is None  # the follower starts over
    assert len(again.hex_serials()) >= len(serials) - 1  # only the damaged line's serial


def test_a_reset_is_journaled_and_the_set_is_kept(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    serials = _serials(50)
    _fill(revoked, serials)
    revoked.reset(77)  # the feed's epoch changed: start over from 0
    revoked.save()
    again = _reloaded(tmp_path)
    assert (again.position, again.epoch, again.checkpoint) == (0, 77, None)
    assert again.hex_serials() == set(serials)


def test_the_node_s_json_file_is_migrated_once(tmp_path: Path) -> None:
    old = tmp_path / "revoked-broker.json"
    serials = _serials(20)
    old.write_text(json.dumps({"last_seq": 20, "serials": serials, "device_ids": ["dev-1"]}))
    migrated = _reloaded(tmp_path)
    assert migrated.hex_serials() == set(serials) and migrated.position == 0
    assert not old.exists() and (tmp_path / "revoked-broker.json.migrated").exists()
    assert (tmp_path / "revoked-broker.snapshot").exists()
    old.write_text(json.dumps({"serials": ["ff"]}))  # a stale copy put back is not read
    assert not _reloaded(tmp_path).is_serial_revoked("ff")


def test_pruning_off_the_loop_drops_only_expired_serials(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    kept = _serials(1000, seed=3)
    _fill(revoked, kept)
    soon = dt.datetime.now(dt.UTC) - CLOCK_SKEW + dt.timedelta(seconds=30)
    revoked.add(["aa01", "aa02"], None, 5000, {"aa01": soon, "aa02": soon})
    asyncio.run(revoked.compact())  # into the sorted buffer
    revoked.add(["bb01"], None, 5001, {"bb01": soon})  # still in the recent dict
    assert revoked.prune() == []
    later = time.time() + 60
    assert revoked.table.may_have_expired(later - CLOCK_SKEW.total_seconds())
    assert revoked.prune(now=later) == ["aa01", "aa02", "bb01"]
    assert revoked.hex_serials() == set(kept)


def test_memory_per_revoked_serial_is_at_most_40_bytes() -> None:
    """Measured with tracemalloc at 50,000 serials, after the writer merged them."""
    serials = _serials(50_000, seed=5)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        revoked = RevokedSet(None)
        for index in range(0, len(serials), 1000):
            for serial in serials[index : index + 1000]:
                revoked.add([serial], None, index, {serial: LATER})
            revoked.save()
        asyncio.run(revoked.compact())
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert revoked.serial_count == 50_000
    assert used / 50_000 < 40, f"{used / 50_000:.1f} bytes per revoked serial"


@pytest.mark.alone
def test_compaction_and_pruning_never_stall_the_loop_for_20_ms(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    _fill(revoked, _serials(100_000, seed=11), batch=1000)
    asyncio.run(revoked.compact())
    _fill(revoked, _serials(6000, seed=12), batch=1000, start_seq=100_000)

    async def longest_stall_during(work: asyncio.Task[list[str]]) -> float:
        longest, before = 0.0, time.perf_counter()
        while not work.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, before = max(longest, now - before), now
        await work
        return longest

    async def measure() -> tuple[float, float]:
        compaction = await longest_stall_during(asyncio.create_task(revoked.compact()))
        pruning = await longest_stall_during(
            asyncio.create_task(revoked.compact(prune=True, snapshot=False))
        )
        return compaction, pruning

    compaction, pruning = asyncio.run(measure())
    assert compaction < 0.020 and pruning < 0.020, (compaction, pruning)
    assert _reloaded(tmp_path).serial_count == 106_000
