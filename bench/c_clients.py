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

Messages/s at the subscriber are first to last delivery; lost = PUBACKed - received unique.
Latency is not reported (the payload's send time would be when its line was written).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import broker_bench_lib as lib

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
_PROBE_TOPIC = "devices/{}/telemetry"


class MissingClients(RuntimeError):
    """mosquitto_pub / mosquitto_sub are not installed."""


def available() -> bool:
    return MOSQUITTO_PUB is not None and MOSQUITTO_SUB is not None


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
    if not available():
        raise MissingClients("install Debian's mosquitto-clients (mosquitto_pub, mosquitto_sub)")
    assert MOSQUITTO_PUB is not None and MOSQUITTO_SUB is not None
    out_file = layout.root / f"c-sub-{time.monotonic_ns()}.txt"
    sub_argv = [
        MOSQUITTO_SUB,
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
        pubs = []
        for index in range(publishers):
            cert, key = lib.device_files(layout, index)
            name = lib.device_id(index)
            port = pub_ports[index % len(pub_ports)]
            pubs.append(
                subprocess.Popen(
                    [
                        MOSQUITTO_PUB,
                        *_tls_args(layout, cert, key, port),
                        "-i",
                        name,
                        "-t",
                        _PROBE_TOPIC.format(name),
                        "-q",
                        "1",
                        "-l",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
            )
        time.sleep(1.0)  # every publisher connected (the handshakes are not measured)

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
        acked = 0
        for process in pubs:
            if process.wait(timeout=timeout_s) == 0:
                acked += messages  # mosquitto_pub -l exits 0 once all were PUBACKed
        for feeder in feeders:
            feeder.join(timeout=10)
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


def _read_deliveries(path: Path) -> dict[str, Any]:
    received: set[tuple[str, int]] = set()
    times: list[float] = []
    for line in path.read_bytes().splitlines():
        stamp, _, payload = line.partition(b" ")
        message = json.loads(payload)
        if "probe" in message:
            continue
        received.add((message["device_id"], message["seq"]))
        times.append(float(stamp))
    span = (max(times) - min(times)) if len(times) > 1 else 0.0
    return {
        "received_unique": len(received),
        "deliveries": len(times),
        "seconds": round(span, 2),
        "msgs_per_s": round(len(times) / span, 0) if span else None,
        "p50_ms": None,
        "p99_ms": None,
    }
