"""Interop: a real Mosquitto with our CA and the registry's CRL refuses a decommissioned
device and accepts a live one (the path for fleets that outgrow our own broker)."""

from __future__ import annotations

import getpass
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from factory.ca import write_issued
from fleetcore.profile import IdentityKind
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.support.pki import TestPKI
from tests.support.ports import free_port
from tests.support.tls import tls_context

MOSQUITTO = Path("/usr/sbin/mosquitto")

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def sqlite_registry(pki: TestPKI, tmp_path: Path) -> Iterator[RegistryServer]:
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}",
    )
    with RegistryServer(settings) as server:
        yield server


def start_mosquitto(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            raise AssertionError(f"mosquitto exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"mosquitto did not listen: {log.read_text()}") from None
            time.sleep(0.05)


def connect_device(port: int, device_id: str, cert: Path, key: Path, root: Path) -> ReasonCode:
    """Connect as ``device_id`` over mTLS; return the CONNACK reason code (raises on TLS)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
    client.tls_set(ca_certs=str(root), certfile=str(cert), keyfile=str(key))
    acks: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: acks.append(reason)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
        deadline = time.monotonic() + 10
        while not acks and time.monotonic() < deadline:
            if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError("connection dropped before CONNACK")
        assert acks, "no CONNACK within 10 s"
        return acks[0]
    finally:
        client.disconnect()
        client.socket() and client.loop(timeout=0.1)


@pytest.mark.skipif(not MOSQUITTO.exists(), reason="mosquitto not installed (/usr/sbin/mosquitto)")
def test_mosquitto_refuses_decommissioned_device_with_registry_crl(
    pki: TestPKI, sqlite_registry: RegistryServer, tmp_path: Path
) -> None:
    operator = pki.client(IdentityKind.OPERATOR, "alice")
    devices = {}
    for device_id in ("mq-live", "mq-dead"):
        issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, device_id))
        write_issued(issued, tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key")
        devices[device_id] = issued
    with httpx.Client(
        base_url=f"{sqlite_registry.url}/api/v1", verify=tls_context(pki, operator)
    ) as http:
        for issued in devices.values():
            body = {"certificate_pem": issued.certificate_pem.decode()}
            assert http.post("/devices", json=body).status_code == 201
        assert http.post("/devices/mq-dead/decommission", json={"reason": "t"}).status_code == 200
        crl = http.get("/crl.pem").content
    (tmp_path / "crl.pem").write_bytes(crl)

    server_cert, server_key = pki.server("mosquitto")
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                "persistence false",
                # run as root (in CI), mosquitto would switch to user 'mosquitto', who cannot
                # read pytest's private temp dirs; as a normal user this line has no effect
                f"user {getpass.getuser()}",
                "log_dest stdout",
                "log_type error",
                "log_type warning",
                "log_type notice",
                f"listener {port} 127.0.0.1",
                f"cafile {pki.layout.chain}",
                f"certfile {server_cert}",
                f"keyfile {server_key}",
                f"crlfile {tmp_path / 'crl.pem'}",
                "require_certificate true",
                "use_identity_as_username true",
                "tls_version tlsv1.2",
                "allow_anonymous false",
                "",
            ]
        )
    )
    log = tmp_path / "mosquitto.log"
    process = start_mosquitto(config, port, log)
    try:
        root = pki.layout.root_cert
        live = connect_device(
            port, "mq-live", tmp_path / "mq-live.crt", tmp_path / "mq-live.key", root
        )
        assert live == 0, f"live device refused: {live} {log.read_text()}"
        with pytest.raises(
            (ssl.SSLError, ConnectionError, OSError),
            match=r"(?i)revoked|alert|reset|dropped|closed|eof",
        ) as refused:
            connect_device(
                port, "mq-dead", tmp_path / "mq-dead.crt", tmp_path / "mq-dead.key", root
            )
        # paho only sees the connection drop; a bare handshake shows the TLS alert's reason.
        context = ssl.create_default_context(cafile=str(root))
        context.load_cert_chain(str(tmp_path / "mq-dead.crt"), str(tmp_path / "mq-dead.key"))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises(ssl.SSLError, match="certificate revoked"),
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.recv(1)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert refused.value is not None
    assert "certificate verify failed" in log.read_text()
