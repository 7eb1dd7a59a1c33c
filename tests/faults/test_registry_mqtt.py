"""The registry's MQTT connection under faults (issues 11.7, 12.10): a lost subscription is
noticed and restored by the watchdog; the registry started while the broker is down
connects once it is up."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from broker.server import BrokerServer
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.db import make_engine, migrate
from registry.settings import RegistrySettings
from registry.telemetry import TelemetryIngest
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, write_device_bundle
from tests.support.ports import free_port
from tests.support.servers import certfleet_broker_settings
from tests.support.waits import wait_for


def _settings(pki: TestPKI, root: Path, port: int) -> RegistrySettings:
    layout = DataLayout(root)
    layout.ca_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.layout.root_cert, layout.root_cert)
    service = pki.client(IdentityKind.SERVICE, "registry")
    layout.clients_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(service.cert, layout.client_cert("registry"))
    shutil.copy(service.key, layout.client_key("registry"))
    return RegistrySettings(
        data_dir=root,
        registry_database_url=f"sqlite:///{root / 'registry.db'}",
        telemetry_broker_addr=f"127.0.0.1:{port}",
        registry_mqtt_watchdog_s=0.5,
    )


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(
        RegistrySettings(registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}")
    )
    migrate(made)
    yield made
    made.dispose()


def _publish_until_received(
    pki: TestPKI, tmp_path: Path, port: int, ingest: TelemetryIngest, timeout: float
) -> bool:
    """A device publishes a reading every 0.1 s until the ingest has accepted a new one."""
    device_id = "dev-watch"
    fleet = tmp_path / "fleet"
    write_device_bundle(pki.ca, fleet, device_id)
    directory = DataLayout(fleet).device_dir(device_id)
    device = connect(
        port, (directory / "device.crt", directory / "device.key"), device_id,
        root=directory / "root.crt",
    )  # fmt: skip
    assert device.connected.is_set(), device.reason
    before = ingest.counters.accepted
    try:
        deadline = time.monotonic() + timeout
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            payload = json.dumps({"device_id": device_id, "seq": seq}).encode()
            device.client.publish(f"devices/{device_id}/telemetry", payload, qos=1)
            if ingest.counters.accepted > before:
                return True
            time.sleep(0.1)
        return False
    finally:
        device.client.disconnect()
        device.client.loop_stop()


def test_a_lost_subscription_is_noticed_and_restored(
    pki: TestPKI, tmp_path: Path, engine: Engine
) -> None:
    """Another connection with the registry's client id (a second process, or a device of
    that name before 11.7) wipes the registry's subscriptions on a clean-session CONNECT:
    the watchdog re-subscribes and telemetry flows again."""
    with BrokerServer(certfleet_broker_settings(pki, tmp_path / "broker")) as broker:
        settings = _settings(pki, tmp_path / "registry", broker.port)
        ingest = TelemetryIngest(settings, engine, flush_interval=0.2).start()
        try:
            assert ingest.subscribed.wait(15)
            # the service name of its certificate and this process's instance name
            assert ingest.client_id.startswith("registry/")
            service = pki.client(IdentityKind.SERVICE, "registry")
            intruder = connect(broker.port, service, ingest.client_id)
            intruder.client.disconnect()
            intruder.client.loop_stop()
            assert _publish_until_received(pki, tmp_path, broker.port, ingest, timeout=15), (
                "telemetry never reached the registry again after its subscriptions were lost"
            )
            # Noticed: by the watchdog (no SUBACK on the orphaned connection, then a
            # reconnect), or because the broker closed the connection it took over.
            assert ingest.counters.connects >= 2
        finally:
            ingest.stop_sync()


def test_registry_started_while_the_broker_is_down_subscribes_once_it_is_up(
    pki: TestPKI, tmp_path: Path, engine: Engine
) -> None:
    port = free_port()
    settings = _settings(pki, tmp_path / "registry", port)
    ingest = TelemetryIngest(settings, engine, flush_interval=0.2).start()
    try:
        assert not ingest.subscribed.wait(1.0)
        broker_settings = certfleet_broker_settings(
            pki, tmp_path / "broker", broker_addr=f"127.0.0.1:{port}"
        )
        with BrokerServer(broker_settings) as broker:
            assert ingest.subscribed.wait(20), "the registry never subscribed"
            assert _publish_until_received(pki, tmp_path, broker.port, ingest, timeout=10)
    finally:
        ingest.stop_sync()


def test_broker_restarted_under_a_running_registry_is_subscribed_again(
    pki: TestPKI, tmp_path: Path, engine: Engine
) -> None:
    port = free_port()
    settings = _settings(pki, tmp_path / "registry", port)
    broker_settings = certfleet_broker_settings(
        pki, tmp_path / "broker", broker_addr=f"127.0.0.1:{port}"
    )
    ingest = TelemetryIngest(settings, engine, flush_interval=0.2).start()
    try:
        with BrokerServer(broker_settings):
            assert ingest.subscribed.wait(20)
        assert wait_for(lambda: not ingest.connected.is_set())  # the broker went away
        with BrokerServer(broker_settings) as broker:
            assert ingest.subscribed.wait(20), "the registry never subscribed again"
            assert _publish_until_received(pki, tmp_path, broker.port, ingest, timeout=10)
    finally:
        ingest.stop_sync()
