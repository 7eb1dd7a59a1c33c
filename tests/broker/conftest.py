"""Broker test fixtures: a broker per test on 127.0.0.1:0 and real paho clients."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from factory.ca import CertificateAuthority, write_issued
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.conftest import ClientFiles, TestPKI


def broker_data_dir(pki: TestPKI, root: Path) -> DataLayout:
    """A fresh data folder holding what a broker reads: CA public files, its TLS pair."""
    layout = DataLayout(root)
    layout.ca_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        pki.layout.root_cert,
        pki.layout.chain,
        pki.layout.issuing_cert,
        pki.layout.ca_meta,
    ):
        shutil.copy(src, layout.ca_dir / src.name)
    if not pki.layout.server_cert("broker").exists():
        pki.server("broker")
    layout.tls_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.layout.server_cert("broker"), layout.server_cert("broker"))
    shutil.copy(pki.layout.server_key("broker"), layout.server_key("broker"))
    return layout


def broker_settings(layout: DataLayout, **overrides: object) -> BrokerSettings:
    values: dict[str, object] = {
        "data_dir": layout.root,
        "broker_addr": "127.0.0.1:0",
        "broker_metrics_addr": "127.0.0.1:0",
        "registry_url": None,
        "broker_handshake_timeout_s": 2.0,
        "broker_connect_timeout_s": 2.0,
    }
    values.update(overrides)
    return BrokerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def broker(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerServer]:
    layout = broker_data_dir(pki, tmp_path / "broker-data")
    with BrokerServer(broker_settings(layout)) as server:
        yield server


def issue_device(
    pki: TestPKI,
    directory: Path,
    device_id: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ca: CertificateAuthority | None = None,
) -> ClientFiles:
    """A device certificate written to ``directory`` (leaf only, like a device bundle)."""
    authority = ca or pki.ca
    issued = authority.issue_client(
        authority.identity(IdentityKind.DEVICE, device_id),
        not_before=not_before,
        not_after=not_after,
    )
    cert, key = directory / f"{device_id}.crt", directory / f"{device_id}.key"
    write_issued(issued, cert, key)
    return ClientFiles(cert, key, pki.layout.root_cert, issued.certificate.serial_number)


@dataclass
class MqttProbe:
    """A real paho client on its own network thread, with what it saw."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    #: (topic, payload, qos, retain) of every message, for tests that look at flags.
    received: list[tuple[str, bytes, int, bool]] = field(default_factory=list)
    session_present: bool | None = None
    suback: list[int] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def freeze(self) -> None:
        """Go silent with the socket open (a half-open connection: no PINGREQ any more)."""
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (the broker then publishes the will)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def connect(
    port: int,
    files: ClientFiles | tuple[Path | None, Path | None],
    client_id: str,
    *,
    root: Path | None = None,
    timeout: float = 10.0,
    clean_session: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
    keepalive: int = 30,
    max_inflight: int = 20,
) -> MqttProbe:
    """Connect a paho client over mTLS; returns the probe once connected, refused or failed.

    ``will`` is (topic, payload, qos, retain); ``max_inflight`` is paho's window of
    unacknowledged QoS 1/2 messages (its default 20).
    """
    cert, key = (files.cert, files.key) if isinstance(files, ClientFiles) else files
    ca_file = root or (files.root if isinstance(files, ClientFiles) else None)
    if protocol is mqtt.MQTTv5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=protocol,
        )
    if will is not None:
        client.will_set(will[0], will[1], qos=will[2], retain=will[3])
    client.tls_set(
        ca_certs=str(ca_file),
        certfile=str(cert) if cert else None,
        keyfile=str(key) if key else None,
    )
    client.reconnect_delay_set(60, 120)  # never reconnect inside a test
    client.max_inflight_messages_set(max_inflight)
    probe = MqttProbe(client)

    def on_connect(_c: mqtt.Client, _u: object, flags: object, rc: object, _p: object) -> None:
        probe.reason = str(rc)
        probe.session_present = bool(getattr(flags, "session_present", False))
        if not getattr(rc, "is_failure", True):
            probe.connected.set()
        else:
            probe.disconnected.set()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        probe.reason = probe.reason or str(rc)
        probe.disconnected.set()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        probe.messages.append((message.topic, message.payload))
        probe.received.append((message.topic, message.payload, message.qos, message.retain))

    def on_subscribe(
        _c: mqtt.Client, _u: object, _mid: int, codes: list[object], _p: object
    ) -> None:
        probe.suback = [int(getattr(code, "value", code)) for code in codes]  # type: ignore[call-overload]
        probe.subscribed.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    try:
        client.connect("127.0.0.1", port, keepalive=keepalive)
    except OSError as exc:  # TLS 1.2 refusals surface here
        probe.reason = f"{type(exc).__name__}: {exc}"
        probe.disconnected.set()
        return probe
    client.loop_start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe.connected.is_set() or probe.disconnected.is_set():
            break
        time.sleep(0.01)
    return probe


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def registry(pki: TestPKI, tmp_path: Path) -> Iterator[RegistryServer]:
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        registry_feed_poll_seconds=0.2,
        telemetry_broker_addr=None,
    )
    with RegistryServer(settings) as server:
        yield server


@pytest.fixture
def operator(pki: TestPKI, registry: RegistryServer) -> Iterator[httpx.Client]:
    files = pki.client(IdentityKind.OPERATOR, "alice")
    with httpx.Client(
        base_url=f"{registry.url}/api/v1",
        verify=tls_context(pki, files),
        timeout=30,
    ) as client:
        yield client


def tls_context(pki: TestPKI, files: ClientFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(files.cert), str(files.key))
    return context


def feed_broker_layout(pki: TestPKI, root: Path) -> DataLayout:
    """Broker data folder plus its service/broker client certificate for the feed."""
    layout = broker_data_dir(pki, root)
    service = pki.client(IdentityKind.SERVICE, "broker")
    layout.clients_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(service.cert, layout.client_cert("broker"))
    shutil.copy(service.key, layout.client_key("broker"))
    return layout


def register(operator: httpx.Client, files: ClientFiles, device_id: str) -> None:
    response = operator.post(
        "/devices",
        json={"certificate_pem": files.cert.read_text(), "hardware_serial": f"hw-{device_id}"},
    )
    assert response.status_code in (200, 201), response.text
