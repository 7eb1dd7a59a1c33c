"""The telemetry ingest's counters on the registry's own /api/v1/metrics: a real broker, a
real registry (SQLite and PostgreSQL) ingesting from it, devices publishing over mTLS, and an
operator reading the Prometheus text over HTTPS."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from registry.metrics import TELEMETRY_DROP_REASONS
from registry.server import RegistryServer
from registry.telemetry import TelemetryIngest
from tests.registry.test_telemetry import _publish_raw
from tests.support.pki import Fleet, TestPKI, write_device_bundle
from tests.support.servers import certfleet_broker_settings, mqtt_registry_settings

DEVICES = ["dev-0030", "dev-0031"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def fleet(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    data_dir = tmp_path_factory.mktemp("telemetry-metrics-fleet")
    return Fleet(data_dir, {d: write_device_bundle(pki.ca, data_dir, d) for d in DEVICES})


@pytest.fixture
def broker(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerServer]:
    with BrokerServer(certfleet_broker_settings(pki, tmp_path / "broker-data")) as server:
        yield server


@pytest.fixture
def ingesting_registry(
    pki: TestPKI, broker: BrokerServer, database_url: str, tmp_path: Path
) -> Iterator[RegistryServer]:
    """A registry whose lifespan runs the telemetry ingest against ``broker``."""
    layout = pki.registry_data_dir(tmp_path / "registry-data")
    settings = mqtt_registry_settings(layout.root, broker.port, registry_database_url=database_url)
    with RegistryServer(settings) as server:
        ingest: TelemetryIngest = server.app.state.telemetry_ingest
        assert ingest.subscribed.wait(15), "registry did not subscribe to the broker"
        yield server


@pytest.fixture
def operator_http(pki: TestPKI, ingesting_registry: RegistryServer) -> Iterator[httpx.Client]:
    files = pki.client(IdentityKind.OPERATOR, "alice")
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(files.cert), str(files.key))
    with httpx.Client(
        base_url=f"{ingesting_registry.url}/api/v1", verify=context, timeout=30
    ) as http:
        yield http


def scrape(http: httpx.Client) -> Samples:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"certfleet_registry_telemetry_{name}", tuple(sorted(labels.items())))]


def test_ingest_counters_are_exported_on_the_registry_metrics(
    fleet: Fleet, broker: BrokerServer, operator_http: httpx.Client
) -> None:
    registration = operator_http.post(
        "/devices/batch",
        json={
            "devices": [
                {
                    "certificate_pem": (fleet.data_dir / "devices" / d / "device.crt").read_text(),
                    "hardware_serial": None,
                }
                for d in DEVICES
            ]
        },
    )
    assert registration.json() == {"created": 2, "existing": 0}
    before = scrape(operator_http)
    assert value(before, "messages_received_total") == 0
    assert value(before, "connected") == 1
    assert value(before, "connects_total") == 1

    first, second = DEVICES
    reading = {"seq": 1, "ts": "2026-11-25T00:00:00Z", "temperature_c": 21.5}
    topic = f"devices/{first}/telemetry"
    _publish_raw(
        fleet,
        broker.port,
        first,
        [(topic, json.dumps({**reading, "device_id": first, "seq": n}).encode()) for n in range(5)]
        + [
            (topic, b"{not json"),
            (topic, json.dumps({**reading, "device_id": second}).encode()),  # names another
        ],
    )
    _publish_raw(
        fleet,
        broker.port,
        second,
        [
            (
                f"devices/{second}/telemetry",
                json.dumps({**reading, "device_id": second, "seq": n}).encode(),
            )
            for n in range(2)
        ],
    )

    # Both devices' rows written (the ingest flushes every 0.5 s) and every message counted.
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(operator_http)
        if (
            value(samples, "messages_received_total") == 9
            and value(samples, "devices_updated_total") >= 2
        ):
            break
        assert time.monotonic() < deadline, f"telemetry metrics never settled: {samples}"
        time.sleep(0.1)

    assert value(samples, "messages_accepted_total") == 7
    assert {
        reason: value(samples, "messages_dropped_total", reason=reason)
        for reason in TELEMETRY_DROP_REASONS
    } == {
        "bad_topic": 0,
        "too_large": 0,
        "malformed_json": 1,
        "device_mismatch": 1,
        "retained_renewal": 0,
        "retained": 0,
    }
    flushes = value(samples, "flushes_total")
    assert 1 <= flushes <= 7
    assert value(samples, "flush_errors_total") == 0
    assert value(samples, "flush_seconds_count") == flushes
    assert 0 < value(samples, "flush_seconds_sum") < 10
    assert 0 < value(samples, "flush_seconds_max") <= value(samples, "flush_seconds_sum")
    # Each flush writes each buffered device once: at least one row per device, at most one
    # per accepted message.
    assert 2 <= value(samples, "devices_updated_total") <= 7
    for device_id in DEVICES:
        assert operator_http.get(f"/devices/{device_id}").json()["last_seen_at"] is not None


def test_registry_without_ingest_exports_no_telemetry_metrics(operator: httpx.Client) -> None:
    text = operator.get("/metrics").text
    assert "certfleet_registry_requests_total" in text
    assert "certfleet_registry_telemetry" not in text
