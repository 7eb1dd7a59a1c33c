"""The renewal storm in numbers: renewals per 10-second bucket, rate and latency percentiles,
and the devices whose certificate ran out before a new one was issued.

Pure functions over plain records, so that the figures of `certfleet sim lifecycle` can be
checked by hand (tests/certfleet/test_lifecycle_stats.py does).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "BUCKET_S",
    "IssuedCertificate",
    "Renewal",
    "RunFigures",
    "bucket_counts",
    "bucket_rates",
    "devices_expired_before_renewal",
    "figures",
    "percentile",
]

#: Width of a rate bucket in seconds (the issue's "rates over 10-second buckets").
BUCKET_S = 10.0


@dataclass(frozen=True, slots=True)
class Renewal:
    """How one renewal of one device ended, as the device saw it.

    ``completed_s`` is seconds since the fleet started; ``latency_s``, for a renewal that
    succeeded, runs from the first request to the device connected with its new certificate
    (refusals, backoff and retries included; None for one that did not). ``refused`` counts the
    refusals received on the way, ``retried`` the requests sent again.
    """

    device_id: str
    completed_s: float
    latency_s: float | None
    refused: int = 0
    retried: int = 0

    @property
    def succeeded(self) -> bool:
        return self.latency_s is not None


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate of a device as the registry recorded it (seconds since the fleet started)."""

    device_id: str
    issued_s: float
    not_after_s: float


@dataclass(frozen=True, slots=True)
class RunFigures:
    """The measured figures of one run (rates per second, latencies in milliseconds)."""

    renewals: int
    peak_renewals_per_s: float
    p99_renewals_per_s: float
    renewal_latency_p50_ms: float | None
    renewal_latency_p99_ms: float | None
    refused: int
    retried: int
    rates: list[float]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between closest ranks
    (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100 (got {q})")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction


def bucket_counts(
    times_s: Iterable[float], duration_s: float, width_s: float = BUCKET_S
) -> list[int]:
    """How many of ``times_s`` (seconds since the start) fall in each bucket
    ``[i*width, (i+1)*width)`` of ``[0, duration_s)``; times outside are not counted."""
    if width_s <= 0:
        raise ValueError(f"bucket width must be positive (got {width_s})")
    if duration_s <= 0:
        return []
    counts = [0] * math.ceil(duration_s / width_s)
    for moment in times_s:
        if 0 <= moment < duration_s:
            counts[int(moment // width_s)] += 1
    return counts


def bucket_rates(
    times_s: Iterable[float], duration_s: float, width_s: float = BUCKET_S
) -> list[float]:
    """Events per second in each bucket. A last, shorter bucket is still divided by the full
    width: it can under-report, never inflate the peak."""
    return [count / width_s for count in bucket_counts(times_s, duration_s, width_s)]


def figures(renewals: Sequence[Renewal], duration_s: float) -> RunFigures:
    """Count, peak and p99 rate (10 s buckets) and latency p50/p99 of the renewals that
    succeeded; refusals and retries of every renewal, successful or not."""
    succeeded = [renewal for renewal in renewals if renewal.latency_s is not None]
    rates = bucket_rates((renewal.completed_s for renewal in succeeded), duration_s)
    latencies_ms = [
        renewal.latency_s * 1000.0 for renewal in succeeded if renewal.latency_s is not None
    ]

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    return RunFigures(
        renewals=len(succeeded),
        peak_renewals_per_s=round(max(rates, default=0.0), 3),
        p99_renewals_per_s=round(percentile(rates, 99) or 0.0, 3),
        renewal_latency_p50_ms=rounded(percentile(latencies_ms, 50), 1),
        renewal_latency_p99_ms=rounded(percentile(latencies_ms, 99), 1),
        refused=sum(renewal.refused for renewal in renewals),
        retried=sum(renewal.retried for renewal in renewals),
        rates=rates,
    )


def devices_expired_before_renewal(
    certificates: Iterable[IssuedCertificate], end_s: float
) -> set[str]:
    """Devices that held no unexpired certificate at some moment before ``end_s``: one of
    their certificates expired before the next was issued, or their newest expired before
    the end of the run."""
    by_device: dict[str, list[IssuedCertificate]] = defaultdict(list)
    for certificate in certificates:
        by_device[certificate.device_id].append(certificate)
    return {device_id for device_id, held in by_device.items() if _gap_before(held, end_s)}


def _gap_before(held: list[IssuedCertificate], end_s: float) -> bool:
    held = sorted(held, key=lambda certificate: certificate.issued_s)
    covered_until = held[0].not_after_s
    for certificate in held[1:]:
        if covered_until >= end_s:
            return False
        if certificate.issued_s > covered_until:
            return True
        covered_until = max(covered_until, certificate.not_after_s)
    return covered_until < end_s
