"""Garbage, truncated and oversized input, half-open floods: the broker keeps serving."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.auth import Refusal
from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.support.mqtt import connect
from tests.support.pki import ClientFiles, TestPKI, issue_device
from tests.support.servers import broker_data_dir, broker_settings
from tests.support.waits import wait_for

# `alone`: timeouts of 1 s measured, keep-alive expiry bounded, a 2000-socket flood (time bounds).
pytestmark = pytest.mark.alone


def connect_packet(client_id: str, keepalive_s: int = 30) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT (clean session)."""
    payload = len(client_id).to_bytes(2, "big") + client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + keepalive_s.to_bytes(2, "big")
    body = variable + payload
    return bytes((0x10, len(body))) + body


@pytest.fixture
def fuzz_broker(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerServer]:
    layout = broker_data_dir(pki, tmp_path / "data")
    settings_ = broker_settings(
        layout, broker_handshake_timeout_s=1.0, broker_connect_timeout_s=1.0
    )
    with BrokerServer(settings_) as server:
        yield server


def device_still_served(pki: TestPKI, broker: BrokerServer, tmp_path: Path, name: str) -> None:
    """A real device connects and its telemetry reaches a real subscriber."""
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    device = connect(broker.port, issue_device(pki, tmp_path, name), name)
    try:
        assert service.connected.is_set() and device.connected.is_set(), device.reason
        service.client.subscribe(f"devices/{name}/telemetry", qos=1)
        assert service.subscribed.wait(5)
        device.client.publish(f"devices/{name}/telemetry", b"{}", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(service.messages) == 1)
    finally:
        device.close()
        service.close()


def tls_socket(pki: TestPKI, files: ClientFiles, port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(files.cert), str(files.key))
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_random_bytes_before_tls_do_not_hurt_the_broker(
    pki: TestPKI, fuzz_broker: BrokerServer, tmp_path: Path
) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=1, max_size=4096))
    def blast(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", fuzz_broker.port), timeout=5) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the broker may already have closed on us

    blast()
    device_still_served(pki, fuzz_broker, tmp_path, "dev-fuzz-1")


def test_random_mqtt_bytes_after_tls_do_not_hurt_the_broker(
    pki: TestPKI, fuzz_broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-fuzzer")
    valid_connect = connect_packet("dev-fuzzer")

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.booleans(), st.binary(max_size=2048))
    def blast(after_connect: bool, data: bytes) -> None:
        with tls_socket(pki, files, fuzz_broker.port) as tls, contextlib.suppress(OSError):
            tls.sendall((valid_connect if after_connect else b"") + data)

    blast()
    device_still_served(pki, fuzz_broker, tmp_path, "dev-fuzz-2")


def test_truncated_and_oversized_packets_are_cut_off(
    pki: TestPKI, fuzz_broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-big")
    with tls_socket(pki, files, fuzz_broker.port) as tls:
        # A CONNECT claiming ~200 MB: refused before anything is buffered.
        tls.sendall(b"\x10\xff\xff\xff\x7f" + b"\x00" * 64)
        assert tls.recv(10) == b""
    assert fuzz_broker.metrics.refusal_count(Refusal.BAD_CONNECT.value) >= 1
    with tls_socket(pki, files, fuzz_broker.port) as tls:
        tls.sendall(connect_packet("dev-big"))
        assert tls.recv(4) == b"\x20\x02\x00\x00"  # CONNACK accepted
        # A ~256 MB PUBLISH announced (topic "a/b"): cut before its payload is buffered.
        tls.sendall(b"\x30\xff\xff\xff\x7f\x00\x03a/b" + b"x" * 1000)
        assert tls.recv(10) == b""
    with tls_socket(pki, files, fuzz_broker.port) as tls:
        tls.sendall(connect_packet("dev-big")[:7])  # truncated CONNECT, then silence
        assert tls.recv(10) == b""  # cut at the CONNECT deadline
    device_still_served(pki, fuzz_broker, tmp_path, "dev-fuzz-3")


def test_thousands_of_half_open_connections_do_not_block_devices(
    pki: TestPKI, fuzz_broker: BrokerServer, tmp_path: Path
) -> None:
    # paho selects on its socket, so its clients connect before the flood takes fds > 1024.
    service = connect(fuzz_broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    device = connect(fuzz_broker.port, issue_device(pki, tmp_path, "dev-flood-1"), "dev-flood-1")
    newcomer = issue_device(pki, tmp_path, "dev-flood-2")
    half_open: list[socket.socket] = []
    try:
        assert service.connected.is_set() and device.connected.is_set()
        service.client.subscribe("devices/+/telemetry", qos=1)
        assert service.subscribed.wait(5)
        half_open = [socket.create_connection(("127.0.0.1", fuzz_broker.port)) for _ in range(2000)]
        with tls_socket(pki, newcomer, fuzz_broker.port) as tls:  # a new device gets in
            tls.sendall(connect_packet("dev-flood-2"))
            assert tls.recv(4) == b"\x20\x02\x00\x00"
        device.client.publish("devices/dev-flood-1/telemetry", b"{}", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(service.messages) == 1)
    finally:
        for sock in half_open:
            sock.close()
        device.close()
        service.close()


def test_silent_client_is_dropped_after_one_and_a_half_keepalives(
    pki: TestPKI, fuzz_broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-idle")
    with tls_socket(pki, files, fuzz_broker.port) as tls:
        tls.sendall(connect_packet("dev-idle", keepalive_s=1))
        assert tls.recv(4) == b"\x20\x02\x00\x00"
        started = time.monotonic()
        tls.settimeout(10)
        assert tls.recv(10) == b""  # closed by the broker, no PINGREQ was sent
        assert 1.4 < time.monotonic() - started < 5
    with tls_socket(pki, files, fuzz_broker.port) as tls:  # PINGREQs keep a session alive
        tls.sendall(connect_packet("dev-idle", keepalive_s=1))
        assert tls.recv(4) == b"\x20\x02\x00\x00"
        for _ in range(4):
            tls.sendall(b"\xc0\x00")
            assert tls.recv(2) == b"\xd0\x00"
            time.sleep(0.5)
