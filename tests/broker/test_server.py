"""The broker end to end: a device publishes telemetry, a service receives it."""

from __future__ import annotations

import json
from pathlib import Path

from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for


def test_device_telemetry_reaches_service_subscriber(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    device_files = issue_device(pki, tmp_path, "dev-ok-1")
    device = connect(broker.port, device_files, "dev-ok-1")
    try:
        assert service.connected.is_set(), service.reason
        assert device.connected.is_set(), device.reason
        service.client.subscribe("devices/+/telemetry", qos=1)
        assert service.subscribed.wait(5)
        assert service.suback == [1]
        payload = json.dumps({"device_id": "dev-ok-1", "seq": 1}).encode()
        device.client.publish("devices/dev-ok-1/telemetry", payload, qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(service.messages) == 1)
        assert service.messages == [("devices/dev-ok-1/telemetry", payload)]
        assert broker.metrics.registry.get_sample_value("certfleet_broker_connections") == 2
    finally:
        device.close()
        service.close()


def test_revoking_a_serial_drops_every_session_that_used_it(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-drop-1")
    bystander = connect(broker.port, issue_device(pki, tmp_path, "dev-stay-1"), "dev-stay-1")
    device = connect(broker.port, files, "dev-drop-1")
    try:
        assert device.connected.is_set() and bystander.connected.is_set()
        assert broker.revoke([format(files.serial, "x")]) == 1
        assert device.disconnected.wait(5)
        assert not bystander.disconnected.is_set()
        assert (
            broker.metrics.registry.get_sample_value(
                "certfleet_broker_revoked_sessions_dropped_total"
            )
            == 1
        )
    finally:
        device.close()
        bystander.close()
