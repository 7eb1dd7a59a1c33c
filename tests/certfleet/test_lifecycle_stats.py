"""The storm's arithmetic, checked by hand: buckets, percentiles, expiry gaps."""

from __future__ import annotations

import pytest

from certfleet.lifecycle_stats import (
    IssuedCertificate,
    Renewal,
    bucket_counts,
    bucket_rates,
    devices_expired_before_renewal,
    figures,
    percentile,
)


def test_bucket_counts_put_each_time_in_its_ten_second_bucket() -> None:
    times = [0.0, 9.999, 10.0, 10.5, 29.0, 30.0, -0.1]
    assert bucket_counts(times, 30.0) == [2, 2, 1]


def test_a_short_last_bucket_is_divided_by_the_full_width() -> None:
    # 25 s: buckets [0,10) [10,20) [20,25); the last one holds 5 renewals in 5 s but
    # reports 0.5/s, never more than a full bucket would.
    times = [21.0, 22.0, 23.0, 24.0, 24.5]
    assert bucket_rates(times, 25.0) == [0.0, 0.0, 0.5]


def test_bucket_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="bucket width must be positive"):
        bucket_counts([1.0], 10.0, width_s=0)


def test_no_duration_means_no_buckets() -> None:
    assert bucket_rates([1.0], 0.0) == []


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_refuses_a_share_outside_0_to_100() -> None:
    with pytest.raises(ValueError, match="within 0..100"):
        percentile([1.0], 101)


def test_figures_of_a_run() -> None:
    renewals = [
        Renewal("dev-1", 1.0, 0.010),
        Renewal("dev-2", 2.0, 0.020, refused=1, retried=1),
        Renewal("dev-3", 3.0, 0.030),
        Renewal("dev-4", 15.0, 0.040, refused=2, retried=3),
        Renewal("dev-5", 16.0, None, refused=1, retried=4),  # refused for good: no rate
    ]
    result = figures(renewals, 30.0)
    assert result.renewals == 4
    assert result.rates == [0.3, 0.1, 0.0]
    assert result.peak_renewals_per_s == 0.3
    # p99 of [0.0, 0.1, 0.3]: position 1.98 -> 0.1 + 0.98 * 0.2
    assert result.p99_renewals_per_s == pytest.approx(0.296)
    assert result.renewal_latency_p50_ms == 25.0
    assert result.renewal_latency_p99_ms == pytest.approx(39.7)
    assert (result.refused, result.retried) == (4, 8)


def test_figures_of_a_run_without_renewals() -> None:
    result = figures([], 20.0)
    assert result.renewals == 0
    assert result.peak_renewals_per_s == 0.0
    assert result.renewal_latency_p50_ms is None


def test_a_device_renewed_in_time_did_not_expire() -> None:
    certificates = [
        IssuedCertificate("dev-1", 0.0, 60.0),
        IssuedCertificate("dev-1", 40.0, 100.0),
        IssuedCertificate("dev-1", 80.0, 140.0),
    ]
    assert devices_expired_before_renewal(certificates, end_s=120.0) == set()


def test_a_gap_between_certificates_is_an_expiry() -> None:
    certificates = [
        IssuedCertificate("dev-1", 0.0, 60.0),
        IssuedCertificate("dev-1", 61.0, 120.0),
        IssuedCertificate("dev-2", 0.0, 60.0),
        IssuedCertificate("dev-2", 59.0, 120.0),
    ]
    assert devices_expired_before_renewal(certificates, end_s=100.0) == {"dev-1"}


def test_a_newest_certificate_expired_before_the_end_is_an_expiry() -> None:
    certificates = [IssuedCertificate("dev-1", 0.0, 60.0)]
    assert devices_expired_before_renewal(certificates, end_s=61.0) == {"dev-1"}
    assert devices_expired_before_renewal(certificates, end_s=60.0) == set()


def test_a_late_certificate_after_the_end_is_not_a_gap_within_the_run() -> None:
    certificates = [
        IssuedCertificate("dev-1", 0.0, 60.0),
        IssuedCertificate("dev-1", 70.0, 130.0),
    ]
    assert devices_expired_before_renewal(certificates, end_s=50.0) == set()
