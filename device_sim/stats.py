"""Counters and latency histograms a worker keeps and the parent merges.

Histograms are log-bucketed (4 % wide buckets) so they are small, mergeable across worker
processes and picklable; percentiles are accurate to a bucket width.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LatencyHistogram", "WorkerStats"]

_BASE_MS = 0.01
_LOG_GROWTH = math.log(1.04)


@dataclass
class LatencyHistogram:
    """Latencies in milliseconds."""

    buckets: Counter[int] = field(default_factory=Counter)
    count: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0

    def record(self, seconds: float) -> None:
        ms = max(seconds * 1000.0, _BASE_MS)
        self.buckets[int(math.log(ms / _BASE_MS) / _LOG_GROWTH)] += 1
        self.count += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)

    def merge(self, other: LatencyHistogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.total_ms += other.total_ms
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0 < q <= 100) in ms, the upper edge of its bucket."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(_BASE_MS * math.exp((index + 1) * _LOG_GROWTH), self.max_ms)
        return self.max_ms

    def summary(self) -> dict[str, float | int | None]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        return {
            "count": self.count,
            "p50_ms": rounded(self.percentile(50)),
            "p95_ms": rounded(self.percentile(95)),
            "p99_ms": rounded(self.percentile(99)),
            "max_ms": rounded(self.max_ms) if self.count else None,
            "mean_ms": rounded(self.total_ms / self.count) if self.count else None,
        }


@dataclass
class WorkerStats:
    """Everything one worker process counts; cumulative, so the latest report wins."""

    devices: int = 0
    connected: int = 0  # right now
    ever_connected: int = 0  # distinct devices that connected at least once
    connects: int = 0  # successful connects, reconnects included
    sent: int = 0  # PUBLISH packets written, retransmissions included
    acked: int = 0  # PUBACKs (QoS 1) or writes (QoS 0) of distinct sequence numbers
    retransmitted: int = 0
    produced: int = 0  # telemetry readings taken (sequence numbers issued)
    dropped_overflow: int = 0  # readings dropped because the unacked window was full
    stopped: int = 0  # devices that gave up for good
    reconnects: int = 0  # successful connects after a device's first
    failovers: int = 0  # successful connects to another broker than the device's last one
    renewals: int = 0  # renewals completed (connected with the new certificate)
    renewal_attempts: int = 0  # CSRs published
    renewal_retried: int = 0  # CSRs published after the first of a renewal
    renewal_timeouts: int = 0  # CSRs without an answer in time
    renewal_switch_failed: int = 0  # new certificates that could not connect (discarded)
    expired_before_renewal: int = 0  # devices whose certificate expired before renewing
    confirms: Counter[str] = field(default_factory=Counter)  # confirmed / refusal / unanswered
    renewal_refused: Counter[str] = field(default_factory=Counter)  # refusals by code
    failures: Counter[str] = field(default_factory=Counter)  # connect failures by reason
    disconnects: Counter[str] = field(default_factory=Counter)  # drops of live sessions
    permanent: Counter[str] = field(default_factory=Counter)  # why devices stopped
    connect_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    publish_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: CSR published -> certificate received, for successful renewal requests.
    renewal_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: How late the worker's housekeeping timer fires: a stalled loop shows up here.
    loop_lag: LatencyHistogram = field(default_factory=LatencyHistogram)
    cpu_seconds: float = 0.0

    def merge(self, other: WorkerStats) -> None:
        for name in (
            "devices",
            "connected",
            "ever_connected",
            "connects",
            "sent",
            "acked",
            "retransmitted",
            "produced",
            "dropped_overflow",
            "stopped",
            "reconnects",
            "failovers",
            "renewals",
            "renewal_attempts",
            "renewal_retried",
            "renewal_timeouts",
            "renewal_switch_failed",
            "expired_before_renewal",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.update(other.failures)
        self.disconnects.update(other.disconnects)
        self.permanent.update(other.permanent)
        self.confirms.update(other.confirms)
        self.renewal_refused.update(other.renewal_refused)
        self.renewal_latency.merge(other.renewal_latency)
        self.connect_latency.merge(other.connect_latency)
        self.publish_latency.merge(other.publish_latency)
        self.loop_lag.merge(other.loop_lag)
        self.cpu_seconds += other.cpu_seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "devices_connected_now": self.connected,
            "devices_connected_ever": self.ever_connected,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "failovers": self.failovers,
            "messages_produced": self.produced,
            "messages_sent": self.sent,
            "messages_acknowledged": self.acked,
            "messages_retransmitted": self.retransmitted,
            "messages_dropped_window_full": self.dropped_overflow,
            "devices_stopped": self.stopped,
            "connect_failures_by_reason": dict(sorted(self.failures.items())),
            "disconnects_by_reason": dict(sorted(self.disconnects.items())),
            "stopped_by_reason": dict(sorted(self.permanent.items())),
            "connect_latency": self.connect_latency.summary(),
            "publish_latency": self.publish_latency.summary(),
            "event_loop_lag": self.loop_lag.summary(),
            "renewals": {
                "renewed": self.renewals,
                "attempts": self.renewal_attempts,
                "retried": self.renewal_retried,
                "timeouts": self.renewal_timeouts,
                "refused_by_code": dict(sorted(self.renewal_refused.items())),
                "switch_failed": self.renewal_switch_failed,
                "expired_before_renewal": self.expired_before_renewal,
                "confirms": dict(sorted(self.confirms.items())),
                "latency": self.renewal_latency.summary(),
            },
            "cpu_seconds": round(self.cpu_seconds, 2),
        }
