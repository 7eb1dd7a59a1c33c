"""The fan-in's load in C: Mosquitto's own clients (``mosquitto_pub``, ``mosquitto_sub``).

The Python clients of bench_broker_throughput.py cost the machine about as much CPU per
message as the broker they measure (TLS through a memory BIO, JSON, one asyncio loop per
role). On a 2-core machine that CPU is taken from the brokers, so a second node can only
show what the clients leave it. Mosquitto's clients (Debian's mosquitto-clients, libmosquitto)
do the same MQTT over the same mTLS for a fraction of it.

- publishers: one ``mosquitto_pub -l -q 1`` per device, its messages on stdin (one JSON
  object a line, as bench_broker_throughput.py sends), all released at one instant; it
  exits 0 once every message was PUBACKed;
- subscriber: one ``mosquitto_sub -q 1`` printing each delivery's receive time and payload;
  it is known to be subscribed when a probe message reaches it.
- shared group (:func:`shared_fan_in`, bench_cluster.py ``--mode shared --clients c``): one
  ``mosquitto_sub`` group member per node (service ``bench``, ``-i bench/m<n>``), run with
  ``-d`` and line-buffered output (``stdbuf -oL``) so its ``Subscribed (mid: 1): <qos>``
  line shows the SUBACK as it comes; the publishers are released once every member has its
  SUBACK and the nodes' ``certfleet_broker_connections`` gauges count every publisher and
  member admitted (no handshake inside the measured span).

Messages/s at the subscriber(s) are first to last delivery; lost = PUBACKed - received
unique (over every member); duplicates = deliveries - received unique. Latency is not
reported (the payload's send time would be when its line was written).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import broker_bench_lib as lib

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
STDBUF = shutil.which("stdbuf")
_PROBE_TOPIC = "devices/{}/telemetry"


class MissingClients(RuntimeError):
    """mosquitto_pub / mosquitto_sub are not installed."""


def available() -> bool:
    return MOSQUITTO_PUB is not None and MOSQUITTO_SUB is not None


def _require() -> tuple[str, str]:
    if MOSQUITTO_PUB is None or MOSQUITTO_SUB is None:
        raise MissingClients("install Debian's mosquitto-clients (mosquitto_pub, mosquitto_sub)")
    return MOSQUITTO_PUB, MOSQUITTO_SUB


def _tls_args(layout: lib.DataLayout, cert: Path, key: Path, port: int) -> list[str]:
    return [
        "-h", "127.0.0.1", "-p", str(port), "--cafile", str(layout.root_cert),
        "--cert", str(cert), "--key", str(key), "--tls-version", "tlsv1.2",
    ]  # fmt: skip


def _lines(name: str, messages: int) -> bytes:
    return "".join(
        json.dumps(
            {
                "device_id": name,
                "seq": seq,
                "ts": 0,
                "temperature_c": 21.5,
                "humidity_pct": 40.0,
                "battery_v": 3.7,
            }
        )
        + "\n"
        for seq in range(messages)
    ).encode()


def _probe(layout: lib.DataLayout, port: int, index: int) -> None:
    """One message from device ``index`` (not one of the publishers)."""
    assert MOSQUITTO_PUB is not None
    cert, key = lib.device_files(layout, index)
    name = lib.device_id(index)
    subprocess.run(
        [MOSQUITTO_PUB, *_tls_args(layout, cert, key, port), "-i", f"{name}",
         "-t", _PROBE_TOPIC.format(name), "-q", "1", "-m", '{"probe": true}'],
        check=False, timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _publisher(
    layout: lib.DataLayout, index: int, port: int, window: int | None = None
) -> subprocess.Popen[bytes]:
    """``mosquitto_pub -l -q 1`` for device ``index``, connected, waiting for its lines;
    ``window``: its QoS 1 messages in flight at most (``-M``; libmosquitto's default 20)."""
    pub, _ = _require()
    cert, key = lib.device_files(layout, index)
    name = lib.device_id(index)
    argv = [pub, *_tls_args(layout, cert, key, port), "-i", name, "-t", _PROBE_TOPIC.format(name)]
    argv += ["-q", "1", "-l"] + (["-M", str(window)] if window else [])
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


def _release_and_wait(
    pubs: list[subprocess.Popen[bytes]], payloads: list[bytes], messages: int, timeout_s: float
) -> int:
    """Write every publisher's lines at once (one thread each) and wait for them to exit;
    the messages acknowledged (``mosquitto_pub -l`` exits 0 once all were PUBACKed)."""

    def feed(process: subprocess.Popen[bytes], data: bytes) -> None:
        assert process.stdin is not None
        process.stdin.write(data)
        process.stdin.close()

    feeders = [
        threading.Thread(target=feed, args=(p, d), daemon=True)
        for p, d in zip(pubs, payloads, strict=True)
    ]
    for feeder in feeders:
        feeder.start()
    acked = sum(messages for process in pubs if process.wait(timeout=timeout_s) == 0)
    for feeder in feeders:
        feeder.join(timeout=10)
    return acked


def fan_in(
    layout: lib.DataLayout,
    sub_port: int,
    pub_ports: list[int],
    publishers: int,
    messages: int,
    *,
    persistent: bool = False,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """``publishers`` x ``messages`` QoS 1 messages, publishers spread over ``pub_ports``
    in turn, to one subscriber on ``sub_port``. The fleet needs ``publishers + 1`` devices
    (the last one sends the probe)."""
    _, mosquitto_sub = _require()
    out_file = layout.root / f"c-sub-{time.monotonic_ns()}.txt"
    sub_argv = [
        mosquitto_sub,
        *_tls_args(layout, layout.client_cert("bench"), layout.client_key("bench"), sub_port),
        "-i", "bench", "-t", "devices/+/telemetry", "-q", "1", "-F", "%U %p",
    ]  # fmt: skip
    if persistent:
        sub_argv.append("-c")  # clean session off
    with out_file.open("wb") as sink:
        sub = subprocess.Popen(sub_argv, stdout=sink)
    try:
        deadline = time.monotonic() + 30
        while out_file.stat().st_size == 0:  # subscribed once a probe gets through
            if time.monotonic() > deadline or sub.poll() is not None:
                raise RuntimeError("mosquitto_sub did not subscribe within 30 s")
            _probe(layout, sub_port, publishers)
            time.sleep(0.2)
        payloads = [_lines(lib.device_id(i), messages) for i in range(publishers)]
        pubs = [_publisher(layout, i, pub_ports[i % len(pub_ports)]) for i in range(publishers)]
        time.sleep(1.0)  # every publisher connected (the handshakes are not measured)
        acked = _release_and_wait(pubs, payloads, messages, timeout_s)
        expected = publishers * messages
        last_size, idle_since = -1, time.monotonic()
        while time.monotonic() - idle_since < 3.0:  # until deliveries stop for 3 s
            size = out_file.stat().st_size
            if size != last_size:
                last_size, idle_since = size, time.monotonic()
            if _count_lines(out_file) >= expected + 1:
                break
            time.sleep(0.2)
    finally:
        sub.terminate()
        sub.wait(timeout=10)
    return {**_read_deliveries(out_file), "acked": acked}


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


Delivery = tuple[str, int]


def _deliveries(path: Path) -> tuple[set[Delivery], list[float]]:
    """The (device, seq) received and each delivery's receive time, from ``-F '%U %p'``
    lines (``-d``'s debug lines, which start with a letter, and probes left out)."""
    received: set[Delivery] = set()
    times: list[float] = []
    for line in path.read_bytes().splitlines():
        if not line[:1].isdigit():
            continue
        stamp, _, payload = line.partition(b" ")
        message = json.loads(payload)
        if "probe" in message:
            continue
        received.add((message["device_id"], message["seq"]))
        times.append(float(stamp))
    return received, times


def _summary(received: set[Delivery], times: list[float]) -> dict[str, Any]:
    span = (max(times) - min(times)) if len(times) > 1 else 0.0
    return {
        "received_unique": len(received),
        "deliveries": len(times),
        "seconds": round(span, 2),
        "msgs_per_s": round(len(times) / span, 0) if span else None,
        "p50_ms": None,
        "p99_ms": None,
    }


def _read_deliveries(path: Path) -> dict[str, Any]:
    return _summary(*_deliveries(path))


def _connections(metrics_url: str) -> float:
    """A node's ``certfleet_broker_connections`` gauge (admitted sessions open)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 - our node
        for line in response.read().decode().splitlines():
            if line.startswith("certfleet_broker_connections "):
                return float(line.split()[1])
    raise RuntimeError(f"{metrics_url}: no certfleet_broker_connections gauge")


def _wait_subscribed(out_file: Path, member: subprocess.Popen[bytes], deadline: float) -> None:
    """Until ``-d``'s ``Subscribed (mid: 1): <granted QoS>`` line is in ``out_file``."""
    while True:
        for line in out_file.read_bytes().splitlines():
            if line.startswith(b"Subscribed (mid: 1): "):
                if line.rsplit(b" ", 1)[1] != b"1":
                    raise RuntimeError(f"{out_file.name}: shared SUBACK refused: {line!r}")
                return
        if member.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{out_file.name}: mosquitto_sub not subscribed within 30 s")
        time.sleep(0.05)


def _wait_connected(metrics_urls: list[str], count: int, pubs: list[Any], timeout_s: float) -> None:
    """Until the nodes count ``count`` admitted sessions between them."""
    deadline = time.monotonic() + timeout_s
    while sum(_connections(url) for url in metrics_urls) < count:
        if any(p.poll() is not None for p in pubs):
            raise RuntimeError("a mosquitto_pub exited before it was released")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} sessions not admitted within {timeout_s:.0f} s")
        time.sleep(0.1)


def shared_fan_in(
    layout: lib.DataLayout,
    member_ports: list[int],
    metrics_urls: list[str],
    pub_ports: list[int],
    messages: int,
    *,
    share_filter: str,
    window: int,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """One shared-group member on each of ``member_ports`` (``bench/m<n>``); device ``i``
    publishes ``messages`` QoS 1 messages (``window`` in flight) on ``pub_ports[i]``.
    ``metrics_urls``: every node's, to see every session admitted before the release."""
    _, mosquitto_sub = _require()
    if STDBUF is None:
        raise MissingClients("stdbuf (coreutils) is needed to line-buffer mosquitto_sub")
    bench_tls = (layout.client_cert("bench"), layout.client_key("bench"))
    stamp = time.monotonic_ns()
    files = [layout.root / f"c-member-{stamp}-{n + 1}.txt" for n in range(len(member_ports))]
    members: list[subprocess.Popen[bytes]] = []
    pubs: list[subprocess.Popen[bytes]] = []
    try:
        for n, (port, out_file) in enumerate(zip(member_ports, files, strict=True)):
            argv = [
                STDBUF, "-oL", mosquitto_sub, *_tls_args(layout, *bench_tls, port), "-d",
                "-i", f"bench/m{n + 1}", "-t", share_filter, "-q", "1", "-F", "%U %p",
            ]  # fmt: skip
            with out_file.open("wb") as sink:
                members.append(subprocess.Popen(argv, stdout=sink))
        deadline = time.monotonic() + 30
        for member, out_file in zip(members, files, strict=True):
            _wait_subscribed(out_file, member, deadline)
        payloads = [_lines(lib.device_id(i), messages) for i in range(len(pub_ports))]
        pubs = [_publisher(layout, i, port, window) for i, port in enumerate(pub_ports)]
        # Every handshake done before the clock (the KV watch that tells each node the other
        # nodes' members has had the handshakes' seconds: no sleep for it).
        _wait_connected(metrics_urls, len(pubs) + len(members), pubs, timeout_s=120)
        acked = _release_and_wait(pubs, payloads, messages, timeout_s)
        expected = len(pub_ports) * messages
        last_size, idle_since = -1, time.monotonic()
        while time.monotonic() - idle_since < 3.0:  # until deliveries stop for 3 s
            sizes = [f.stat().st_size for f in files]
            if sum(sizes) != last_size:
                last_size, idle_since = sum(sizes), time.monotonic()
            if sum(f.read_bytes().count(b" received PUBLISH ") for f in files) >= expected:
                break
            time.sleep(0.2)
    finally:
        for process in (*pubs, *members):
            if process.poll() is None:
                process.terminate()
        for process in (*pubs, *members):
            process.wait(timeout=10)
    per_member = [_deliveries(f) for f in files]
    received = set().union(*(r for r, _ in per_member))
    times = [t for _, member_times in per_member for t in member_times]
    return {
        **_summary(received, times),
        "acked": acked,
        "duplicates": len(times) - len(received),
        "lost": acked - len(received),
        "per_member": [len(member_times) for _, member_times in per_member],
    }
