"""A publisher that goes away right after its last PUBACK loses nothing.

amqtt acknowledges a QoS 1 PUBLISH when it queues it for routing and ended the client's
message loop at the disconnect, dropping what was still queued: PUBACKed, never delivered.
Seen with ``mosquitto_pub -l`` (it disconnects at the last PUBACK): 31-40 of 2,000
acknowledged messages never reached the subscriber."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.broker.conftest import connect, issue_device, wait_for
from tests.conftest import TestPKI

COUNT = 2000


@pytest.mark.parametrize("leaves", ["disconnect", "drop"])
def test_every_acknowledged_message_is_routed_after_the_publisher_left(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path, leaves: str
) -> None:
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    assert service.connected.is_set(), service.reason
    service.client.subscribe("devices/+/telemetry", qos=1)
    assert service.subscribed.wait(5)
    files = issue_device(pki, tmp_path, "dev-burst")
    device = connect(broker.port, files, "dev-burst", max_inflight=500)
    assert device.connected.is_set(), device.reason
    try:
        infos = [
            device.client.publish("devices/dev-burst/telemetry", str(n).encode(), qos=1)
            for n in range(COUNT)
        ]
        assert wait_for(lambda: all(info.is_published() for info in infos), 30)
    finally:
        # At once, as mosquitto_pub does: whatever the broker still holds unrouted now was
        # already acknowledged.
        device.close() if leaves == "disconnect" else device.drop()
    try:
        assert wait_for(lambda: len(service.messages) >= COUNT, 20), len(service.messages)
        assert sorted(int(p) for _, p in service.messages) == list(range(COUNT))
    finally:
        service.close()
