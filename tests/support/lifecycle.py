"""What `certfleet sim lifecycle --json` reports per run (the report's and the storm's tests)."""

from __future__ import annotations

#: The keys of one run in the JSON report, in order.
RUN_KEYS = [
    "stagger_s",
    "renewals",
    "peak_renewals_per_s",
    "p99_renewals_per_s",
    "renewal_latency_p50_ms",
    "renewal_latency_p99_ms",
    "refused",
    "retried",
    "expired_before_renewal",
    "superseded_revoked",
]
