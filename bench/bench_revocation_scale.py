"""The broker's revoked set at 10k / 100k / 500k serials: memory, load, append, loop stalls.

For each size: bytes per revoked serial (tracemalloc, the set alone), the broker's start from
its own files (load), the cost of one event (add + append), and the longest event-loop stall
a 1 ms ticker task sees while the set is filled as a feed replay does (batches of 1,000,
one append each, the background writer compacting); beside the same figures of the code on
the code before issue 23 (``git show 67df084:broker/revocation.py``, ``--old-ref``, imported
under another name: one JSON file rewritten after every batch, on the loop), where it
finishes. (``main`` already holds the new code once this branch is merged.)

    python bench/bench_revocation_scale.py [--sizes 10000,100000,500000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

from broker.revocation_journal import Checkpoint
from broker.revoked_set import RevokedSet
from fleetcore.profile import serial_hex

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=60)
BATCH = 1000


def _serials(count: int) -> list[str]:
    rng = random.Random(count)
    return [serial_hex(rng.getrandbits(159) | 1) for _ in range(count)]


def _old_module(ref: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{ref}:broker/revocation.py"], capture_output=True, text=True, check=True
    ).stdout
    if "class RevokedSet" not in source:
        raise SystemExit(f"{ref}:broker/revocation.py is not the old RevokedSet; pass --old-ref")
    path = Path(tempfile.mkdtemp()) / "old_revocation.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_revocation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _memory(make: Any, serials: list[str]) -> float:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    revoked = make()
    for index in range(0, len(serials), BATCH):
        # Fresh strings, as a feed answer parses them (not the bench's own list's).
        chunk = [(s + " ")[:-1] for s in serials[index : index + BATCH]]
        revoked.add(chunk, None, index, {s: LATER for s in chunk})
    if isinstance(revoked, RevokedSet):
        asyncio.run(revoked.compact())
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(serials)


async def _replay_new(folder: Path, serials: list[str]) -> tuple[float, float]:
    """Fill a journaled set as a replay does, with its writer running; (longest stall, s)."""
    revoked = RevokedSet(folder, fsync_s=1.0)
    writer = asyncio.create_task(revoked.keep_persisted())
    longest, seq = 0.0, 0
    started = time.perf_counter()

    async def ticker() -> None:
        nonlocal longest
        before = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, before = max(longest, now - before), now

    tick = asyncio.create_task(ticker())
    for index in range(0, len(serials), BATCH):
        for serial in serials[index : index + BATCH]:
            seq += 1
            revoked.add([serial], None, seq, {serial: LATER})
            if seq % 100 == 0:
                await asyncio.sleep(0)  # the follower's apply slices
        revoked.advance(seq, 1, Checkpoint(seq, "x"))
        revoked.save()
        await asyncio.sleep(0)
    while revoked._journal_outgrown() or revoked._recent_outgrown():  # noqa: SLF001
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    tick.cancel()
    writer.cancel()
    revoked.close()
    return longest, elapsed


def _append_cost(folder: Path) -> float:
    """Seconds per event: add + one append of its line (a batch of one)."""
    revoked = RevokedSet(folder)
    revoked.load()
    serials = _serials(2000)
    started = time.perf_counter()
    for seq, serial in enumerate(serials, start=10_000_000):
        revoked.add([serial], None, seq, {serial: LATER})
        revoked.advance(seq, 1, Checkpoint(seq, "x"))
        revoked.save()
    return (time.perf_counter() - started) / len(serials)


def _new_figures(serials: list[str]) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp())
    stall, replay_s = asyncio.run(_replay_new(folder, serials))
    started = time.perf_counter()
    loaded = RevokedSet(folder)
    loaded.load()
    load_s = time.perf_counter() - started
    assert loaded.serial_count == len(serials)
    return {
        "bytes_per_serial": _memory(lambda: RevokedSet(None), serials),
        "load_s": load_s,
        "append_us": _append_cost(folder) * 1e6,
        "replay_max_stall_ms": stall * 1000,
        "replay_s": replay_s,
    }


def _old_figures(old: ModuleType, serials: list[str]) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp())
    path = folder / "revoked-broker.json"
    revoked = old.RevokedSet(path)
    for index in range(0, len(serials), BATCH):
        chunk = serials[index : index + BATCH]
        revoked.add(chunk, None, index, {s: LATER for s in chunk})
    started = time.perf_counter()
    revoked.save()  # what every batch of a replay costs the loop at this size
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = old.RevokedSet(path)
    loaded.load()
    load_s = time.perf_counter() - started
    return {
        "bytes_per_serial": _memory(lambda: old.RevokedSet(None), serials),
        "load_s": load_s,
        "append_us": save_s * 1e6,  # one event = one whole-file rewrite
        "replay_max_stall_ms": save_s * 1000,
        "replay_s": save_s * len(serials) / BATCH,  # lower bound: the saves alone
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,500000")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--old-ref", default="67df084", help="commit with the old RevokedSet")
    args = parser.parse_args()
    old = _old_module(args.old_ref)
    rows: list[dict[str, Any]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        serials = _serials(size)
        new, was = _new_figures(serials), _old_figures(old, serials)
        rows.append({"serials": size, "new": new, "old": was})
        if not args.json:
            figures = " | ".join(f"{name} {new[name]:.2f} (old {was[name]:.2f})" for name in new)
            print(f"{size:>7} serials | {figures}", flush=True)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
