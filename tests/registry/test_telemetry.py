"""Telemetry ingest: the registry's subscriber writes last seen / last telemetry in batches
and drops what it must not trust. Real broker (ours), real devices, real SQLite."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine
from sqlmodel import Session

from broker.server import BrokerServer
from device_sim.bundle import DeviceBundle
from device_sim.device import DeviceConfig, SimDevice
from device_sim.stats import WorkerStats
from fleetcore.errors import ConfigError
from registry.certs import parse_device_certificate
from registry.db import make_engine, migrate
from registry.settings import RegistrySettings
from registry.store import audit, devices
from registry.telemetry import TelemetryIngest, TelemetryRejected, parse_telemetry
from tests.support.pki import Fleet, TestPKI, write_device_bundle
from tests.support.servers import certfleet_broker_settings

DEVICES = ["dev-0020", "dev-0021", "dev-0022"]


@pytest.fixture(scope="module")
def fleet(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    data_dir = tmp_path_factory.mktemp("telemetry-fleet")
    return Fleet(data_dir, {d: write_device_bundle(pki.ca, data_dir, d) for d in DEVICES})


@pytest.fixture
def broker(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerServer]:
    with BrokerServer(certfleet_broker_settings(pki, tmp_path / "broker-data")) as server:
        yield server


def _registry_settings(pki: TestPKI, root: Path, broker_port: int) -> RegistrySettings:
    pki.registry_data_dir(root, signing=False)
    return RegistrySettings(
        data_dir=root,
        registry_database_url=f"sqlite:///{root / 'registry.db'}",
        telemetry_broker_addr=f"127.0.0.1:{broker_port}",
    )


def _registered_engine(pki: TestPKI, fleet: Fleet, settings: RegistrySettings) -> Engine:
    engine = make_engine(settings)
    migrate(engine)
    registrations = [
        devices.Registration(
            parse_device_certificate(
                (fleet.data_dir / "devices" / device_id / "device.crt").read_text(),
                issuing_cert=pki.ca.issuing_cert,
                trust_domain=pki.ca.trust_domain,
            )
        )
        for device_id in DEVICES
    ]
    with Session(engine) as session:
        devices.register_devices(session, registrations, audit.Actor("test"))
    return engine


def _publish_raw(
    fleet: Fleet, port: int, device_id: str, payloads: list[tuple[str, bytes]]
) -> None:
    """A bare paho client with the device's certificate publishing the given messages."""
    directory = fleet.data_dir / "devices" / device_id
    context = ssl.create_default_context(cafile=str(directory / "root.crt"))
    context.load_cert_chain(str(directory / "device.crt"), str(directory / "device.key"))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
    client.tls_set_context(context)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert connected.wait(10)
        for topic, payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _run_devices(fleet: Fleet, port: int, seconds: float) -> WorkerStats:
    async def scenario() -> WorkerStats:
        stats = WorkerStats(devices=2)
        slots = asyncio.Semaphore(4)
        config = DeviceConfig("127.0.0.1", port, rate=10.0)
        loop = asyncio.get_running_loop()
        devices = [
            SimDevice(
                DeviceBundle.load(fleet.data_dir / "devices" / device_id),
                config,
                stats,
                connect_slots=slots,
                rng=random.Random(1),
            )
            for device_id in DEVICES[:2]
        ]
        await asyncio.gather(*(d.run(stop_at=loop.time() + seconds) for d in devices))
        return stats

    return asyncio.run(scenario())


def test_ingest_batches_last_seen_and_drops_untrusted_messages(
    pki: TestPKI, fleet: Fleet, broker: BrokerServer, tmp_path: Path
) -> None:
    settings = _registry_settings(pki, tmp_path / "registry", broker.port)
    engine = _registered_engine(pki, fleet, settings)
    ingest = TelemetryIngest(settings, engine, flush_interval=0.2).start()
    try:
        assert ingest.connected.wait(10), "ingest did not connect to the broker"
        started = dt.datetime.now(dt.UTC)
        stats = _run_devices(fleet, broker.port, 1.5)
        own_topic = f"devices/{DEVICES[2]}/telemetry"
        _publish_raw(
            fleet,
            broker.port,
            DEVICES[2],
            [
                (own_topic, b"{not json"),
                (own_topic, b"[1, 2, 3]"),
                (own_topic, json.dumps({"device_id": DEVICES[0], "seq": 1}).encode()),
            ],
        )
        deadline = time.monotonic() + 10
        expected_received = stats.acked + 3
        while time.monotonic() < deadline and ingest.counters.received < expected_received:
            time.sleep(0.05)
        assert ingest.counters.received == expected_received
    finally:
        ingest.stop_sync()
    assert ingest.counters.rejected == {"malformed_json": 2, "device_mismatch": 1}
    assert ingest.counters.accepted == stats.acked
    # Batched: far fewer writes than messages.
    assert 1 <= ingest.counters.flushes < stats.acked / 2
    with Session(engine) as session:
        for device_id in DEVICES[:2]:
            device = devices.get_device(session, device_id)
            assert device.last_seen_at is not None
            seen = device.last_seen_at.replace(tzinfo=device.last_seen_at.tzinfo or dt.UTC)
            assert seen >= started - dt.timedelta(seconds=1)
            assert device.last_telemetry is not None
            assert device.last_telemetry["device_id"] == device_id
            assert device.last_telemetry["seq"] >= 10
        # The mismatched message named DEVICES[0] but came from DEVICES[2]: nothing stored.
        assert devices.get_device(session, DEVICES[2]).last_seen_at is None
    engine.dispose()


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("devices/dev-1/telemetry", b"\xff\xfe", "malformed_json"),
        ("devices/dev-1/telemetry", b'"just a string"', "malformed_json"),
        ("devices/dev-1/telemetry", b'{"device_id": "dev-2"}', "device_mismatch"),
        ("devices/dev-1/telemetry", b'{"seq": 1}', "device_mismatch"),
        ("devices/dev-1/status", b'{"device_id": "dev-1"}', "bad_topic"),
        ("devices/../telemetry", b'{"device_id": ".."}', "bad_topic"),
        (
            "devices/dev-1/telemetry",
            b'{"device_id": "dev-1", "x": "' + b"a" * 20000 + b'"}',
            "too_large",
        ),
    ],
)
def test_parse_telemetry_rejects(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(TelemetryRejected, match=".") as caught:
        parse_telemetry(topic, payload)
    assert caught.value.reason == reason


def test_parse_telemetry_accepts_a_matching_reading() -> None:
    device_id, telemetry = parse_telemetry(
        "devices/dev-1/telemetry", b'{"device_id": "dev-1", "seq": 7, "temperature_c": 21.5}'
    )
    assert device_id == "dev-1"
    assert telemetry["seq"] == 7


def test_ingest_refuses_to_start_without_its_service_certificate(tmp_path: Path) -> None:
    settings = RegistrySettings(data_dir=tmp_path, telemetry_broker_addr="127.0.0.1:8883")
    with pytest.raises(ConfigError, match="service certificate"):
        TelemetryIngest(settings, make_engine(settings))


def test_ingest_refuses_to_start_without_a_broker_address(tmp_path: Path) -> None:
    settings = RegistrySettings(data_dir=tmp_path)
    with pytest.raises(ConfigError, match="TELEMETRY_BROKER_ADDR"):
        TelemetryIngest(settings, make_engine(settings))


def test_two_registry_replicas_ingest_each_reading_once(
    pki: TestPKI, fleet: Fleet, broker: BrokerServer, tmp_path: Path
) -> None:
    """Both replicas subscribe through the shared group: the broker gives each reading to
    one of them, and both take part."""
    settings = _registry_settings(pki, tmp_path / "registry", broker.port)
    engine = _registered_engine(pki, fleet, settings)
    replicas = [
        TelemetryIngest(
            settings.model_copy(update={"registry_instance": name}), engine, flush_interval=0.2
        ).start()
        for name in ("r1", "r2")
    ]
    try:
        for replica in replicas:
            assert replica.subscribed.wait(10), "a replica's shared subscription was refused"
        readings = [
            (
                f"devices/{DEVICES[index % 2]}/telemetry",
                json.dumps({"device_id": DEVICES[index % 2], "seq": index}).encode(),
            )
            for index in range(60)
        ]
        _publish_raw(fleet, broker.port, DEVICES[0], [r for r in readings if DEVICES[0] in r[0]])
        _publish_raw(fleet, broker.port, DEVICES[1], [r for r in readings if DEVICES[1] in r[0]])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(r.counters.received for r in replicas) < 60:
            time.sleep(0.05)
        time.sleep(0.3)  # a second copy would arrive by now
        assert [r.counters.received for r in replicas] != [60, 60]
        assert sum(r.counters.received for r in replicas) == 60
        assert sum(r.counters.accepted for r in replicas) == 60
        assert all(r.counters.received >= 15 for r in replicas)  # both share the work
    finally:
        for replica in replicas:
            replica.stop_sync()
    with Session(engine) as session:
        for device_id in DEVICES[:2]:
            assert devices.get_device(session, device_id).last_seen_at is not None
    engine.dispose()
