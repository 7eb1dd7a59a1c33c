"""What device_sim relies on in paho's internals (device_sim/paho_adapter.py), pinned against
real TLS connections so that a paho upgrade that changes it fails here, loudly."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from device_sim.bundle import DeviceBundle, tls_context
from device_sim.paho_adapter import DeviceSocket, PreparedSocketClient
from device_sim.transport import open_tls
from tests.device_sim.conftest import MosquittoFactory
from tests.support.pki import Fleet, TestPKI


@dataclass
class Recorder:
    """Every paho callback the adapter's users depend on, in order."""

    calls: list[str] = field(default_factory=list)
    opened: list[Any] = field(default_factory=list)
    connack: list[bool] = field(default_factory=list)

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self.socket_open
        client.on_socket_close = lambda c, u, s: self.calls.append("socket_close")
        client.on_socket_register_write = lambda c, u, s: self.calls.append("register_write")
        client.on_socket_unregister_write = lambda c, u, s: self.calls.append("unregister_write")
        client.on_connect = self.connect
        client.on_disconnect = lambda c, u, f, r, p: self.calls.append("disconnect")

    def socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.calls.append("socket_open")
        self.opened.append(sock)

    def connect(self, client: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        self.calls.append("connect")
        self.connack.append(not reason.is_failure)


def _handshaken(bundle: DeviceBundle, port: int) -> ssl.SSLSocket:
    return asyncio.run(open_tls("127.0.0.1", port, tls_context(bundle)))


def _pump(client: mqtt.Client, sock: DeviceSocket, until: Any, timeout: float = 10.0) -> None:
    """Drive the client as the simulator's loop does (readable -> loop_read), bounded."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        if client.want_write():
            client.loop_write()
        if sock.fileno() < 0:  # paho closed it
            return
        readable, _, _ = select.select([sock.fileno()], [], [], 0.05)
        if readable:
            client.loop_read()


pytestmark = pytest.mark.mosquitto


def test_reconnect_speaks_mqtt_over_the_given_socket_and_opens_none_itself(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    broker = mosquitto()
    bundle = DeviceBundle.load(fleet.data_dir / "devices" / "dev-0040")
    tls = _handshaken(bundle, broker.port)
    tls.setblocking(True)
    sock = DeviceSocket(tls)
    client = PreparedSocketClient(bundle.device_id, sock)
    recorder = Recorder()
    recorder.attach(client)
    # An address that does not resolve: had paho opened a connection itself, this would fail.
    client.connect_async("unresolvable.invalid", 1, keepalive=30)
    assert client.reconnect() == mqtt.MQTT_ERR_SUCCESS
    assert recorder.opened == [sock]  # our object, handed back through the public callback
    assert tls.getblocking() is False  # paho made it non-blocking, as the event loop needs
    _pump(client, sock, lambda: recorder.connack)
    assert recorder.connack == [True]
    with pytest.raises(ConnectionError, match="used already"):
        client.reconnect()
    tls.close()


class _CorruptingServer:
    """A TLS server that completes one handshake, then writes bytes that are no TLS record
    straight onto the TCP connection: the client's next read fails in TLS."""

    def __init__(self, pki: TestPKI) -> None:
        cert, key = pki.server("paho-pin")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(cafile=str(pki.layout.chain))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshaken = threading.Event()
        self.corrupt = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        raw, _ = self.listener.accept()
        conn = self.context.wrap_socket(raw, server_side=True)
        self.handshaken.set()
        self.corrupt.wait(10)
        os.write(conn.fileno(), b"\x00" * 64)
        self.closed.wait(10)
        conn.close()

    def close(self) -> None:
        self.corrupt.set()
        self.closed.set()
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def corrupting_server(pki: TestPKI) -> Iterator[_CorruptingServer]:
    server = _CorruptingServer(pki)
    yield server
    server.close()


def test_a_failed_read_closes_through_the_callback_and_the_socket_keeps_the_error(
    fleet: Fleet, corrupting_server: _CorruptingServer
) -> None:
    bundle = DeviceBundle.load(fleet.data_dir / "devices" / "dev-0041")
    tls = _handshaken(bundle, corrupting_server.port)
    sock = DeviceSocket(tls)
    client = PreparedSocketClient(bundle.device_id, sock)
    recorder = Recorder()
    recorder.attach(client)
    client.connect_async("127.0.0.1", corrupting_server.port, keepalive=30)
    client.reconnect()
    assert corrupting_server.handshaken.wait(10)
    corrupting_server.corrupt.set()
    _pump(client, sock, lambda: "disconnect" in recorder.calls)
    # paho closes the socket through on_socket_close, then reports the drop...
    assert recorder.calls[0] == "socket_open"
    assert recorder.calls[-2:] == ["socket_close", "disconnect"]
    # ...and keeps the reason to itself: our socket object holds it.
    assert isinstance(sock.error, ssl.SSLError)
    assert not isinstance(sock.error, ssl.SSLWantReadError | ssl.SSLWantWriteError)
    assert tls.fileno() == -1  # paho closed it
    sock.close()  # closing twice is harmless


def test_try_again_conditions_are_not_recorded_as_errors(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    broker = mosquitto()
    bundle = DeviceBundle.load(fleet.data_dir / "devices" / "dev-0042")
    sock = DeviceSocket(_handshaken(bundle, broker.port))
    with pytest.raises(ssl.SSLWantReadError):
        sock.recv(1)  # nothing sent yet: TLS wants more data, paho reads it as "try again"
    assert sock.error is None
    sock.close()
