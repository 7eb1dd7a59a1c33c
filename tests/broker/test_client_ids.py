"""Client ids: an empty one gets the certificate's id; ``from-certificate`` replaces any;
``strict`` (the default) refuses a mismatch and logs both ids. Real paho clients, raw
CONNECTs for what paho will not send, and mosquitto_pub where it is installed."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.auth import ClientIdMode, Refusal
from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import ClientFiles, TestPKI, issue_device
from tests.support.servers import broker_data_dir, broker_settings
from tests.support.waits import wait_for


@pytest.fixture
def lenient_broker(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerServer]:
    layout = broker_data_dir(pki, tmp_path / "lenient-data")
    settings = broker_settings(layout, broker_client_id=ClientIdMode.FROM_CERTIFICATE)
    with BrokerServer(settings) as server:
        yield server


def _telemetry_watcher(pki: TestPKI, broker: BrokerServer) -> MqttProbe:
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    assert service.connected.is_set(), service.reason
    service.client.subscribe("devices/+/telemetry", qos=1)
    assert service.subscribed.wait(5)
    return service


def _publishes_as_itself(probe: MqttProbe, service: MqttProbe, device_id: str) -> None:
    """The session is the device's: its own topics are open to it."""
    topic = f"devices/{device_id}/telemetry"
    probe.client.subscribe(f"devices/{device_id}/#", qos=1)
    assert probe.subscribed.wait(5) and probe.suback == [1]
    probe.client.publish(topic, b"hello", qos=1).wait_for_publish(5)
    assert wait_for(lambda: (topic, b"hello") in service.messages)


def test_empty_client_id_with_clean_session_gets_the_device_id(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    service = _telemetry_watcher(pki, broker)
    probe = connect(broker.port, issue_device(pki, tmp_path, "dev-e"), "")
    try:
        assert probe.connected.is_set(), probe.reason
        _publishes_as_itself(probe, service, "dev-e")
    finally:
        probe.close()
        service.close()


def _raw_connect(pki: TestPKI, files: ClientFiles, port: int, client_id: str, flags: int) -> bytes:
    """Send a hand-made MQTT 3.1.1 CONNECT; return the broker's answer (a CONNACK)."""
    payload = len(client_id).to_bytes(2, "big") + client_id.encode()
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + (30).to_bytes(2, "big") + payload
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(files.cert), str(files.key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(bytes((0x10, len(body))) + body)
        return tls.recv(4)


def test_empty_client_id_without_clean_session_is_rejected(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-e2")
    before = broker.metrics.refusal_count(Refusal.EMPTY_CLIENT_ID.value)
    assert _raw_connect(pki, files, broker.port, "", flags=0x00) == b"\x20\x02\x00\x02"
    assert broker.metrics.refusal_count(Refusal.EMPTY_CLIENT_ID.value) == before + 1


def test_mismatching_client_id_is_refused_and_both_ids_logged(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="broker.gate"):
        probe = connect(broker.port, issue_device(pki, tmp_path, "dev-m1"), "someone-else")
        probe.close()
    assert not probe.connected.is_set() and probe.reason == "Not authorized"
    lines = [r.getMessage() for r in caplog.records if "client refused" in r.getMessage()]
    assert any(
        "reason=client_id_mismatch" in line
        and "client_id='someone-else'" in line
        and "certificate_id='dev-m1'" in line
        for line in lines
    ), lines


def test_from_certificate_replaces_any_client_id(
    pki: TestPKI, lenient_broker: BrokerServer, tmp_path: Path
) -> None:
    service = _telemetry_watcher(pki, lenient_broker)
    files = issue_device(pki, tmp_path, "dev-fc")
    probes = [connect(lenient_broker.port, files, cid) for cid in ("anything", "")]
    try:
        for probe in probes:
            assert probe.connected.is_set(), probe.reason
        # Both got the device's session: the second took the first one over.
        assert wait_for(lambda: probes[0].disconnected.is_set())
        probes[1].messages.clear()
        _publishes_as_itself(probes[1], service, "dev-fc")
    finally:
        for probe in probes:
            probe.close()
        service.close()


def _mosquitto_pub(
    pki: TestPKI, files: ClientFiles, port: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("mosquitto_pub")
    if binary is None:
        pytest.skip("mosquitto_pub is not installed (Debian package mosquitto-clients)")
    argv = [
        binary, "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki.layout.root_cert),
        "--cert", str(files.cert), "--key", str(files.key), "-q", "1",
        "-t", "devices/dev-mq/telemetry", "-m", "from mosquitto", *extra,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)


def test_mosquitto_pub_client_ids(
    pki: TestPKI, broker: BrokerServer, lenient_broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-mq")
    expected = [("devices/dev-mq/telemetry", b"from mosquitto")]
    strict_service = _telemetry_watcher(pki, broker)
    try:
        # mosquitto_pub without -i sends an empty client id (clean session): it gets the
        # device's id.
        assert _mosquitto_pub(pki, files, broker.port).returncode == 0
        assert wait_for(lambda: strict_service.messages == expected)
        before = broker.metrics.refusal_count(Refusal.CLIENT_ID_MISMATCH.value)
        refused = _mosquitto_pub(pki, files, broker.port, "-i", "other")
        assert refused.returncode != 0 and "not authorised" in refused.stderr + refused.stdout
        assert broker.metrics.refusal_count(Refusal.CLIENT_ID_MISMATCH.value) == before + 1
    finally:
        strict_service.close()
    service = _telemetry_watcher(pki, lenient_broker)
    try:  # from-certificate: any id becomes the device's
        assert _mosquitto_pub(pki, files, lenient_broker.port, "-i", "other").returncode == 0
        assert wait_for(lambda: service.messages == expected)
    finally:
        service.close()
