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

import argparse
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    repo: Path = REPO,
    cpus: set[int] | None = None,
) -> BrokerProcess:
    """Our broker, as a process; ``repo``: the checkout whose code runs (another commit's
    worktree runs that commit's broker); ``cpus``: the only CPUs it may run on."""
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
    process = subprocess.Popen(
        command, cwd=repo, env=env, stdout=subprocess.DEVNULL, preexec_fn=pinned_to(cpus)
    )
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

    Each worker holds its share of connections until its stdin is closed. ``script`` may be
    this module's own file (``__file__``): its ``--worker`` is :func:`hold_devices`.
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


def issue_operator(layout: DataLayout, name: str = "bench-op") -> None:
    """An operator client certificate in ``layout``'s clients/ (registry API over mTLS)."""
    ca = CertificateAuthority.load(layout)
    operator = ca.issue_client(ca.identity(IdentityKind.OPERATOR, name))
    write_issued(operator, layout.client_cert(name), layout.client_key(name))


async def hold_devices(data_dir: Path, port: int, start: int, end: int, concurrency: int) -> None:
    """Connect devices ``start..end``; print ``{"ok", "failed"}``, then one
    ``{"closed": device, "at": POSIX time}`` line per session the broker closes, until
    stdin closes."""
    layout = DataLayout(data_dir)
    semaphore = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    ok = failed = 0

    async def one(index: int) -> None:
        nonlocal ok, failed
        async with semaphore:
            try:
                client = await connect_device(layout, port, index)
            except (OSError, TimeoutError, ConnectionError):
                failed += 1
                return
            ok += 1

            def report(_: asyncio.Future[None]) -> None:
                print(json.dumps({"closed": device_id(index), "at": time.time()}), flush=True)

            client.closed.add_done_callback(report)

    await asyncio.gather(*(one(i) for i in range(start, end)))
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


async def ping_probe(data_dir: Path, port: int, index: int, gap_s: float = 0.002) -> None:
    """One connected device sending PINGREQ after PINGRESP without pause (``gap_s``): print
    ``{"at": POSIX time sent, "rtt_ms": round trip}`` for each round trip of 5 ms or more, and
    ``{"pings": n}`` every second; the broker's event-loop stalls are the long round trips."""
    layout = DataLayout(data_dir)
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] | None = None

    def on_plain(data: bytes) -> None:
        if PINGRESP in data and waiter is not None and not waiter.done():
            waiter.set_result(None)

    cert, key = device_files(layout, index)
    _, client = await loop.create_connection(
        lambda: TlsClient(client_context(layout, cert, key), on_plain), "127.0.0.1", port
    )
    client.send(connect_packet(device_id(index)))
    await asyncio.wait_for(client.ready, 60)
    await asyncio.sleep(0.2)  # the CONNACK
    print(json.dumps({"ready": True}), flush=True)
    pings, reported = 0, time.monotonic()
    while not client.closed.done():
        waiter = loop.create_future()
        sent, started = time.time(), time.perf_counter()
        client.send(PINGREQ)
        await asyncio.wait([waiter, client.closed], return_when=asyncio.FIRST_COMPLETED)
        rtt = (time.perf_counter() - started) * 1000
        pings += 1
        if rtt >= 5:
            print(json.dumps({"at": sent, "rtt_ms": round(rtt, 2)}), flush=True)
        if time.monotonic() - reported >= 1:
            print(json.dumps({"pings": pings}), flush=True)
            reported = time.monotonic()
        await asyncio.sleep(gap_s)


def pinned_to(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that keeps a child (all its threads) on ``cpus`` (None: anywhere)."""
    if cpus is None:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


class StallProbe:
    """:func:`ping_probe` in its own process; :meth:`longest` is the longest round trip sent
    within a window of POSIX times."""

    def __init__(self, data_dir: Path, port: int, index: int, cpus: set[int] | None = None) -> None:
        argv = [PYTHON, __file__, "--probe", "--data-dir", str(data_dir), "--port", str(port),
                "--start", str(index)]  # fmt: skip
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, text=True, preexec_fn=pinned_to(cpus)
        )
        self.stalls: list[tuple[float, float]] = []
        self.pings = 0
        self._lock = threading.Lock()
        first = self.process.stdout.readline()  # type: ignore[union-attr]
        if not first:
            raise RuntimeError("the stall probe did not connect")
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            event = json.loads(line)
            with self._lock:
                if "rtt_ms" in event:
                    self.stalls.append((float(event["at"]), float(event["rtt_ms"])))
                elif "pings" in event:
                    self.pings = int(event["pings"])

    def longest(self, start: float, end: float) -> float:
        time.sleep(0.3)  # the last lines in flight
        with self._lock:
            inside = [rtt for at, rtt in self.stalls if start <= at <= end]
        return max(inside, default=0.0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class DropWatcher:
    """Reads the ``closed`` lines of :func:`hold_devices` workers: when each session closed."""

    def __init__(self, workers: list[subprocess.Popen[str]]) -> None:
        self.closed: dict[str, float] = {}
        self.connected = 0
        self._lock = threading.Lock()
        for worker in workers:
            self.connected += int(json.loads(worker.stdout.readline())["ok"])  # type: ignore[union-attr]
        for worker in workers:
            threading.Thread(target=self._pump, args=(worker,), daemon=True).start()

    def _pump(self, worker: subprocess.Popen[str]) -> None:
        for raw in worker.stdout:  # type: ignore[union-attr]
            event = json.loads(raw)
            if "closed" in event:
                with self._lock:
                    self.closed[event["closed"]] = float(event["at"])

    def wait_closed(self, name: str, timeout: float = 5.0) -> float | None:
        """When ``name``'s session closed (POSIX time), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                at = self.closed.get(name)
            if at is not None:
                return at
            time.sleep(0.001)
        return None

    def closed_names(self) -> set[str]:
        with self._lock:
            return set(self.closed)


def time_drops(
    http: Any, watcher: DropWatcher, names: list[str], timeout: float = 5.0
) -> tuple[list[float], int]:
    """Decommission each device in turn over the registry API (``http``: an operator's
    client on ``/api/v1``); returns the seconds from each call's answer to its session's
    close, and how many sessions were still open after ``timeout``."""
    latencies: list[float] = []
    missed = 0
    for name in names:
        response = http.post(f"/devices/{name}/decommission", json={"reason": "bench"})
        returned = time.time()
        response.raise_for_status()
        at = watcher.wait_closed(name, timeout)
        if at is None:
            missed += 1
        else:
            latencies.append(at - returned)
    return latencies, missed


def stop_workers(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        if worker.stdin:
            worker.stdin.close()
        worker.wait(timeout=60)


def _main() -> None:
    parser = argparse.ArgumentParser(description="device workers of the broker benchmarks")
    parser.add_argument("--worker", action="store_true", help="hold_devices")
    parser.add_argument("--probe", action="store_true", help="ping_probe device --start")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int)
    args = parser.parse_args()
    raise_nofile()
    if args.probe:
        asyncio.run(ping_probe(args.data_dir, args.port, args.start))
    else:
        asyncio.run(hold_devices(args.data_dir, args.port, args.start, args.end, 200))


if __name__ == "__main__":
    _main()
