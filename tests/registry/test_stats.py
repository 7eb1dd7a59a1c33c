"""Stats, health, metrics and the telemetry store."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import httpx
from sqlmodel import Session

from factory.ca import IssuedCertificate
from registry.server import RegistryServer
from registry.store import telemetry
from tests.support.pki import pem

Mint = Callable[..., IssuedCertificate]


def monday(day: dt.datetime) -> str:
    return (day.date() - dt.timedelta(days=day.weekday())).isoformat()


def test_stats_counts_by_status_and_expiries_per_week(operator: httpx.Client, mint: Mint) -> None:
    now = dt.datetime.now(dt.UTC)
    in_3_weeks = now + dt.timedelta(weeks=3)
    in_5_weeks = now + dt.timedelta(weeks=5)
    batch = [
        mint("st-0", not_after=in_3_weeks),
        mint("st-1", not_after=in_3_weeks),
        mint("st-2", not_after=in_5_weeks),
        mint("st-3", not_after=in_5_weeks),
    ]
    operator.post("/devices/batch", json={"devices": [{"certificate_pem": pem(c)} for c in batch]})
    operator.post("/devices/st-3/decommission", json={"reason": "x"})
    stats = operator.get("/stats").json()
    assert stats["devices_by_status"] == {"active": 3, "decommissioned": 1}
    assert stats["expiries_per_week"] == [
        {"week_start": monday(in_3_weeks), "count": 2},
        {"week_start": monday(in_5_weeks), "count": 1},
    ]
    assert stats["seen_last_minute"] == 0


def test_record_telemetry_updates_last_seen(
    operator: httpx.Client, mint: Mint, registry: RegistryServer
) -> None:
    operator.post("/devices", json={"certificate_pem": pem(mint("tel-1"))})
    now = dt.datetime.now(dt.UTC)
    updates = [
        telemetry.TelemetryUpdate("tel-1", now - dt.timedelta(seconds=5), {"seq": 1}),
        telemetry.TelemetryUpdate("tel-1", now, {"seq": 2, "temperature_c": 21.5}),
        telemetry.TelemetryUpdate("unknown-device", now, {"seq": 9}),
    ]
    with Session(registry.state.engine) as session:
        assert telemetry.record_telemetry(session, updates) == 2
        # an older update arriving late does not overwrite the newer one
        telemetry.record_telemetry(
            session, [telemetry.TelemetryUpdate("tel-1", now - dt.timedelta(minutes=1), {"seq": 0})]
        )
    device = operator.get("/devices/tel-1").json()
    assert device["last_telemetry"] == {"seq": 2, "temperature_c": 21.5}
    assert dt.datetime.fromisoformat(device["last_seen_at"]) == now.replace(
        microsecond=now.microsecond
    )
    assert operator.get("/stats").json()["seen_last_minute"] == 1


def test_health_and_metrics(anonymous: httpx.Client, operator: httpx.Client) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok", "head_seq": 0}
    assert anonymous.get("/metrics").status_code == 401
    text = operator.get("/metrics").text
    assert (
        'certfleet_registry_requests_total{method="GET",route="/api/v1/healthz",status="200"} 1.0'
        in text
    )
    for name in (
        "auth_refusals_total",
        "registrations_total",
        "decommissions_total",
        "feed_waiters",
        "crl_resigns_total",
    ):
        assert f"certfleet_registry_{name}" in text
