"""The collector's passes are observed by generation, with their duration, only while
started; a full pass over many container objects is seen as a long one."""

from __future__ import annotations

import gc

from broker.gc_pauses import GcPauses


def test_each_collection_is_observed_with_its_generation_while_started() -> None:
    seen: list[tuple[int, float]] = []
    pauses = GcPauses(lambda generation, seconds: seen.append((generation, seconds)))
    gc.collect()
    assert not seen  # not started
    pauses.start()
    pauses.start()  # idempotent: one observation per pass
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.stop()
    assert [generation for generation, _ in seen] == [0, 2]
    assert all(seconds >= 0 for _, seconds in seen)
    gc.collect()
    assert len(seen) == 2  # stopped


def test_a_full_pass_over_many_objects_takes_longer_than_a_young_one() -> None:
    seen: dict[int, float] = {}
    pauses = GcPauses(lambda generation, seconds: seen.__setitem__(generation, seconds))
    held = [[index] for index in range(300_000)]  # tracked containers, as sessions hold
    gc.collect()
    pauses.start()
    try:
        gc.collect(0)
        young = seen[0]
        gc.collect(2)
    finally:
        pauses.stop()
    assert seen[2] > young and seen[2] > 0.001, seen
    del held
