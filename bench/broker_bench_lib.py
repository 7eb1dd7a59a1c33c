"""Shared pieces of the broker benchmarks: a fleet on disk, the three brokers, raw clients.

The three brokers compared, each a separate process so its RSS is its own:
- ours: ``certfleet broker serve`` (amqtt + our mTLS listener);
- stock amqtt 0.12.1: ``amqtt.broker.Broker`` with its own TLS listener (bench/stock_amqtt.py);
- Mosquitto (Debian's /usr/sbin/mosquitto) with its own config on an ephemeral port,
  ``require_certificate true``. The system mosquitto on 1883 is never touched.

Clients are asyncio connections driving TLS over memory BIOs (so that client processes do
not need 256 KiB per connection themselves) and writing MQTT packets as bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from factory.ca import CertificateAuthority, write_issued  # noqa: E402
from fleetcore import tls  # noqa: E402
from fleetcore.layout import DataLayout  # noqa: E402
from fleetcore.profile import IdentityKind  # noqa: E402

PYTHON = sys.executable
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def device_id(index: int) -> str:
    return f"dev-{index:06d}"


def make_fleet(root: Path, devices: int, services: tuple[str, ...] = ("bench",)) -> DataLayout:
    """CA, broker server cert, ``devices`` device certs and service certs under ``root``."""
    layout = DataLayout(root)
    ca = CertificateAuthority.init(layout, "fleet.bench")
    issued = ca.issue_server("broker", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    write_issued(
        issued,
        layout.server_cert("broker"),
        layout.server_key("broker"),
        intermediate=ca.issuing_cert,
    )
    for name in services:
        svc = ca.issue_client(ca.identity(IdentityKind.SERVICE, name))
        write_issued(svc, layout.client_cert(name), layout.client_key(name))
    for index in range(devices):
        name = device_id(index)
        dev = ca.issue_client(ca.identity(IdentityKind.DEVICE, name))
        write_issued(
            dev, layout.device_dir(name) / "device.crt", layout.device_dir(name) / "device.key"
        )
    return layout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass
class BrokerProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_url: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_ours(
    layout: DataLayout,
    *,
    registry_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> BrokerProcess:
    ready = layout.root / f"broker-ready-{time.monotonic_ns()}.json"
    command = [
        PYTHON,
        "-m",
        "certfleet.cli",
        "--log-level",
        "warning",
        "broker",
        "serve",
        "--data-dir",
        str(layout.root),
        "--addr",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
    ]
    if registry_url:
        command += ["--registry-url", registry_url]
    command += extra_args or []
    env = dict(os.environ, **(extra_env or {}))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("our broker did not start")
        time.sleep(0.05)
    body = json.loads(ready.read_text())
    return BrokerProcess(
        "ours", process, int(body["addr"].rsplit(":", 1)[1]), body.get("metrics_url")
    )


def start_stock(layout: DataLayout) -> BrokerProcess:
    port = free_port()
    command = [
        PYTHON,
        str(REPO / "bench" / "stock_amqtt.py"),
        "--port",
        str(port),
        "--data-dir",
        str(layout.root),
    ]
    process = subprocess.Popen(command, cwd=REPO)
    wait_port(port)
    return BrokerProcess("stock-amqtt", process, port)


def start_mosquitto(layout: DataLayout, *, persistence: bool = False) -> BrokerProcess:
    """Mosquitto on an ephemeral port; ``persistence`` turns on its on-disk store."""
    port = free_port()
    conf = layout.root / f"mosquitto-{port}.conf"
    store = layout.root / f"mosquitto-{port}-store"
    store.mkdir(exist_ok=True)
    conf.write_text(
        "\n".join(
            [
                "per_listener_settings false",
                "user root",  # stay the benchmark's user: the data dir is 0700
                "allow_anonymous true",
                f"persistence {'true' if persistence else 'false'}",
                f"persistence_location {store}/",
                "log_dest none",
                "max_queued_messages 1000000",
                f"listener {port} 127.0.0.1",
                f"cafile {layout.chain}",
                f"certfile {layout.server_cert('broker')}",
                f"keyfile {layout.server_key('broker')}",
                "require_certificate true",
                "tls_version tlsv1.2",
                "",
            ]
        )
    )
    process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], preexec_fn=raise_nofile)
    wait_port(port)
    return BrokerProcess("mosquitto", process, port)


# -- MQTT bytes ---------------------------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int = 600, *, clean: bool = True) -> bytes:
    flags = b"\x02" if clean else b"\x00"
    body = b"\x00\x04MQTT\x04" + flags + keepalive.to_bytes(2, "big")
    body += len(client_id).to_bytes(2, "big") + client_id.encode()
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += payload
    return bytes((0x30 | (qos << 1),)) + _remaining_length(len(body)) + body


def subscribe_packet(topic: str, qos: int, packet_id: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + len(topic).to_bytes(2, "big") + topic.encode()
    body += bytes((qos,))
    return b"\x82" + _remaining_length(len(body)) + body


class TlsClient(asyncio.Protocol):
    """A client-side TLS connection over memory BIOs with a plaintext callback."""

    def __init__(self, context: ssl.SSLContext, on_plaintext: Callable[[bytes], None]) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.on_plaintext = on_plaintext
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._step()

    def _flush(self) -> None:
        if self.outgoing.pending and self.transport is not None:
            self.transport.write(self.outgoing.read())

    def _step(self) -> None:
        if not self.ready.done():
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as exc:
                self.ready.set_exception(exc)
                if self.transport:
                    self.transport.close()
                return
            self.ready.set_result(None)
            for data in self.pending:
                self.tls.write(data)
            self.pending.clear()
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                if self.transport:
                    self.transport.close()
                break
            if not chunk:
                break
            self.on_plaintext(chunk)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes) -> None:
        if not self.ready.done():
            self.pending.append(data)
            return
        try:
            self.tls.write(data)
        except ssl.SSLError:
            return
        self._flush()


def client_context(layout: DataLayout, cert: Path, key: Path) -> ssl.SSLContext:
    return tls.client_context(layout.root_cert, cert, key)


def device_files(layout: DataLayout, index: int) -> tuple[Path, Path]:
    d = layout.device_dir(device_id(index))
    return d / "device.crt", d / "device.key"


def tmp_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def lscpu_model() -> str:
    for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=False
    ).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


async def connect_device(layout: DataLayout, port: int, index: int) -> TlsClient:
    """Open device ``index``'s mTLS session and wait for an accepting CONNACK.

    Raises ConnectionError (refused), OSError or TimeoutError, like any failed connect.
    """
    loop = asyncio.get_running_loop()
    cert, key = device_files(layout, index)
    context = client_context(layout, cert, key)
    connack: asyncio.Future[bytes] = loop.create_future()
    buffer = bytearray()

    def on_plain(data: bytes) -> None:
        buffer.extend(data)
        if len(buffer) >= 4 and not connack.done():
            connack.set_result(bytes(buffer[:4]))

    _, client = await loop.create_connection(
        lambda: TlsClient(context, on_plain), "127.0.0.1", port
    )
    client.send(connect_packet(device_id(index)))
    reply = await asyncio.wait_for(connack, 60)
    if reply != CONNACK_ACCEPTED:
        if client.transport is not None:
            client.transport.close()
        raise ConnectionError(f"CONNACK {reply.hex()}")
    return client


def spawn_device_workers(
    script: str, data_dir: Path, port: int, devices: int, procs: int
) -> list[subprocess.Popen[str]]:
    """Start ``procs`` copies of ``script --worker``, splitting device indexes 0..devices.

    Each worker holds its share of connections until its stdin is closed.
    """
    per_proc = devices // procs
    workers = []
    for p in range(procs):
        start, end = p * per_proc, devices if p == procs - 1 else (p + 1) * per_proc
        argv = [
            sys.executable, script, "--worker", "--data-dir", str(data_dir),
            "--port", str(port), "--start", str(start), "--end", str(end),
        ]  # fmt: skip
        workers.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=raise_nofile,  # each child holds thousands of sockets
            )
        )
    return workers
