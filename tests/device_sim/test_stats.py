"""Latency histograms and worker counters: percentiles, merging across workers, summary."""

from __future__ import annotations

import pickle

from device_sim.stats import LatencyHistogram, WorkerStats


def test_percentiles_are_accurate_to_a_bucket() -> None:
    histogram = LatencyHistogram()
    for ms in range(1, 1001):
        histogram.record(ms / 1000.0)
    for q, expected in ((50, 500), (95, 950), (99, 990)):
        value = histogram.percentile(q)
        assert value is not None
        assert expected <= value <= expected * 1.05
    assert histogram.summary()["max_ms"] == 1000.0
    assert LatencyHistogram().percentile(50) is None


def test_stats_from_several_workers_merge_and_pickle() -> None:
    first, second = WorkerStats(devices=2), WorkerStats(devices=3)
    first.acked, second.acked = 10, 5
    first.failures["connection_refused"] += 2
    second.failures["connection_refused"] += 1
    second.permanent["certificate_revoked"] += 1
    first.publish_latency.record(0.002)
    second.publish_latency.record(0.004)
    merged = WorkerStats()
    for stats in (first, pickle.loads(pickle.dumps(second))):
        merged.merge(stats)
    summary = merged.as_dict()
    assert summary["devices"] == 5
    assert summary["messages_acknowledged"] == 15
    assert summary["connect_failures_by_reason"] == {"connection_refused": 3}
    assert summary["stopped_by_reason"] == {"certificate_revoked": 1}
    assert summary["publish_latency"]["count"] == 2
