"""A publisher that goes away right after its last PUBACK loses nothing.

amqtt acknowledges a QoS 1 PUBLISH when it queues it for routing, ended the client's message
loop at the disconnect and, within a second, emptied the queue of the disconnected clean
session: PUBACKed, never delivered. Seen with ``mosquitto_pub -l`` (it disconnects at the
last PUBACK): 31-40 of 2,000 acknowledged messages, and 49 of one publisher's 400 in a burst
of 50 publishers, never reached the subscriber."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for

# `alone`: races between a publisher leaving (or being taken over) and routing, reproduced with
# bursts of 2000 QoS 1 messages; under 4 xdist workers on 2 cores the takeover test once saw 112
# PUBACKed messages not delivered within its 20 s (passed under 2 workers and alone).
pytestmark = pytest.mark.alone

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


@pytest.mark.mosquitto
def test_a_burst_of_mosquitto_pub_clients_leaving_at_their_last_puback_loses_nothing(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    binary = shutil.which("mosquitto_pub")
    if binary is None:
        pytest.skip("mosquitto_pub is not installed (Debian package mosquitto-clients)")
    publishers, each = 50, 400
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    assert service.connected.is_set(), service.reason
    service.client.subscribe("devices/+/telemetry", qos=1)
    assert service.subscribed.wait(5)
    results: dict[str, int] = {}

    def publish(device_id: str) -> None:
        files = issue_device(pki, tmp_path, device_id)
        argv = [
            binary, "-h", "127.0.0.1", "-p", str(broker.port),
            "--cafile", str(pki.layout.root_cert), "--cert", str(files.cert),
            "--key", str(files.key), "-i", device_id, "-q", "1", "-l",
            "-t", f"devices/{device_id}/telemetry",
        ]  # fmt: skip
        lines = "".join(f"{device_id} {n}\n" for n in range(each))
        done = subprocess.run(argv, input=lines, capture_output=True, text=True, timeout=60)
        results[device_id] = done.returncode

    threads = [
        threading.Thread(target=publish, args=(f"dev-leave-{n:02d}",)) for n in range(publishers)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        # mosquitto_pub exits 0 once its last message is PUBACKed: all of them were sent.
        assert results == {f"dev-leave-{n:02d}": 0 for n in range(publishers)}
        total = publishers * each
        assert wait_for(lambda: len(service.messages) >= total, 30), len(service.messages)
        received = {payload.decode() for _, payload in service.messages}
        expected = {f"dev-leave-{p:02d} {n}" for p in range(publishers) for n in range(each)}
        assert received == expected
    finally:
        service.close()


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_a_takeover_mid_burst_loses_nothing_the_old_connection_had_acknowledged(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path, clean_session: bool
) -> None:
    """The same identity connects again while its first connection is still publishing: the
    broker closes the first (takeover) through the same disconnect path, and every message
    that connection had PUBACKed still reaches the subscriber."""
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    assert service.connected.is_set(), service.reason
    service.client.subscribe("devices/+/telemetry", qos=1)
    assert service.subscribed.wait(5)
    files = issue_device(pki, tmp_path, "dev-twice")
    first = connect(broker.port, files, "dev-twice", clean_session=clean_session, max_inflight=500)
    assert first.connected.is_set(), first.reason
    second = None
    try:
        infos = [
            first.client.publish("devices/dev-twice/telemetry", f"first {n}".encode(), qos=1)
            for n in range(COUNT)
        ]
        assert wait_for(lambda: sum(info.is_published() for info in infos) >= COUNT // 4, 30)
        second = connect(broker.port, files, "dev-twice", clean_session=clean_session)
        assert second.connected.is_set(), second.reason
        assert first.disconnected.wait(5), "the older connection was not closed"
        first.client.loop_stop()
        acknowledged = {f"first {n}" for n, info in enumerate(infos) if info.is_published()}
        assert len(acknowledged) >= COUNT // 4
        second.client.publish("devices/dev-twice/telemetry", b"second 0", qos=1).wait_for_publish(
            10
        )
        expected = acknowledged | {"second 0"}

        def received() -> set[str]:
            return {payload.decode() for _, payload in service.messages}

        assert wait_for(lambda: expected <= received(), 20), len(expected - received())
    finally:
        first.client.loop_stop()
        if second is not None:
            second.close()
        service.close()
