"""Benchmark: telemetry fan-in to one service subscriber, QoS 1, over mTLS.

    flock /tmp/certfleet-bench.lock python bench/bench_broker_throughput.py

P device publishers (one client process) each send M QoS 1 messages to
``devices/<id>/telemetry`` with at most W unacknowledged at a time; one service subscriber
(its own process) subscribed to ``devices/+/telemetry`` at QoS 1 acknowledges every
delivery. Reported per broker: delivered messages/s at the subscriber (first to last
delivery), messages lost (sent and PUBACKed but never delivered), and end-to-end latency
p50/p99 (publisher's send time in the payload vs subscriber's receive time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broker_bench_lib as lib  # noqa: E402

#: How long a subscriber waits for its first message before its idle clock runs.
FIRST_MESSAGE_WAIT_S = 120.0


class MqttStream:
    """Splits a plaintext byte stream into MQTT packets."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        packets = []
        while len(self.buffer) >= 2:
            length, multiplier, pos = 0, 1, 1
            while True:
                if pos >= len(self.buffer):
                    return packets
                byte = self.buffer[pos]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                pos += 1
                if not byte & 0x80:
                    break
            if len(self.buffer) < pos + length:
                return packets
            packets.append((self.buffer[0], bytes(self.buffer[pos : pos + length])))
            del self.buffer[: pos + length]
        return packets


async def _subscriber(
    data_dir: Path,
    port: int,
    expected: int,
    idle_s: float,
    *,
    clean: bool = True,
    topic_filter: str = "devices/+/telemetry",
    client_id: str = "bench",
) -> None:
    layout = lib.DataLayout(data_dir)
    loop = asyncio.get_running_loop()
    context = lib.client_context(layout, layout.client_cert("bench"), layout.client_key("bench"))
    stream = MqttStream()
    received: set[tuple[str, int]] = set()
    latencies: list[float] = []
    times: list[float] = []
    suback = loop.create_future()
    last = [time.monotonic()]
    client_ref: list[lib.TlsClient] = []

    def on_plain(data: bytes) -> None:
        now = time.time()
        acks = bytearray()
        for first, body in stream.feed(data):
            kind = first >> 4
            if kind == 9 and not suback.done():
                suback.set_result(body)
            elif kind == 3:
                qos = (first >> 1) & 3
                tlen = int.from_bytes(body[:2], "big")
                pos = 2 + tlen
                if qos:
                    acks += b"\x40\x02" + body[pos : pos + 2]
                    pos += 2
                payload = json.loads(body[pos:])
                received.add((payload["device_id"], payload["seq"]))
                latencies.append(now - payload["ts"])
                times.append(now)
        if acks:
            client_ref[0].send(bytes(acks))
        last[0] = time.monotonic()

    _, client = await loop.create_connection(
        lambda: lib.TlsClient(context, on_plain), "127.0.0.1", port
    )
    client_ref.append(client)
    client.send(lib.connect_packet(client_id, clean=clean))
    client.send(lib.subscribe_packet(topic_filter, 1))
    body = await asyncio.wait_for(suback, 30)
    print(json.dumps({"subscribed": body[-1]}), flush=True)
    # Idle counts from the first message: many publishers' TLS handshakes to a node under a
    # CPU quota can take longer than ``idle_s`` (bench_cluster.py --node-cpu).
    started = time.monotonic()
    while not times and time.monotonic() - started < FIRST_MESSAGE_WAIT_S:
        await asyncio.sleep(0.05)
    while len(received) < expected and time.monotonic() - last[0] < idle_s:
        await asyncio.sleep(0.05)
    latencies.sort()
    span = (times[-1] - times[0]) if len(times) > 1 else 0.0
    result = {
        "received_unique": len(received),
        "deliveries": len(times),
        "seconds": round(span, 2),
        "msgs_per_s": round(len(times) / span, 0) if span else None,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else None,
        "first_ts": times[0] if times else None,
        "last_ts": times[-1] if times else None,
    }
    print(json.dumps(result), flush=True)


async def _publishers(
    data_dir: Path, port: int, first: int, count: int, messages: int, window: int
) -> None:
    layout = lib.DataLayout(data_dir)
    loop = asyncio.get_running_loop()
    acked = 0

    async def one(index: int) -> None:
        nonlocal acked
        cert, key = lib.device_files(layout, index)
        context = lib.client_context(layout, cert, key)
        name = lib.device_id(index)
        topic = f"devices/{name}/telemetry"
        stream = MqttStream()
        connack = loop.create_future()
        credit = asyncio.Semaphore(window)

        def on_plain(data: bytes) -> None:
            nonlocal acked
            for first_byte, _body in stream.feed(data):
                kind = first_byte >> 4
                if kind == 2 and not connack.done():
                    connack.set_result(None)
                elif kind == 4:
                    acked += 1
                    credit.release()

        _, client = await loop.create_connection(
            lambda: lib.TlsClient(context, on_plain), "127.0.0.1", port
        )
        client.send(lib.connect_packet(name))
        await asyncio.wait_for(connack, 60)
        connected.append(index)
        await start.wait()
        for seq in range(messages):
            await credit.acquire()
            payload = json.dumps(
                {
                    "device_id": name,
                    "seq": seq,
                    "ts": time.time(),
                    "temperature_c": 21.5,
                    "humidity_pct": 40.0,
                    "battery_v": 3.7,
                }
            ).encode()
            client.send(lib.publish_packet(topic, payload, qos=1, packet_id=seq % 65535 + 1))
        for _ in range(window):  # wait for the last PUBACKs
            await asyncio.wait_for(credit.acquire(), 120)
        if client.transport is not None:
            client.transport.close()

    start = asyncio.Event()
    connected: list[int] = []
    tasks = [asyncio.create_task(one(i)) for i in range(first, first + count)]
    deadline = time.monotonic() + 120
    while len(connected) < count and time.monotonic() < deadline:  # connect before the clock
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    start.set()
    await asyncio.gather(*tasks)
    print(
        json.dumps(
            {"sent": count * messages, "acked": acked, "seconds": round(time.monotonic() - t0, 2)}
        ),
        flush=True,
    )


def run_broker(name: str, layout: lib.DataLayout, args: argparse.Namespace) -> dict[str, object]:
    starter = {
        "ours": lib.start_ours,
        "stock-amqtt": lib.start_stock,
        "mosquitto": lib.start_mosquitto,
    }[name]
    broker = starter(layout)
    expected = args.publishers * args.messages
    profiler = None
    if args.profile:
        profiler = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(broker.pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "-o",
                f"{args.profile}-{name}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        sub = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "sub",
                "--data-dir",
                str(layout.root),
                "--port",
                str(broker.port),
                "--expected",
                str(expected),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        json.loads(sub.stdout.readline())  # type: ignore[union-attr]  # subscribed
        pub = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "pub",
                "--data-dir",
                str(layout.root),
                "--port",
                str(broker.port),
                "--publishers",
                str(args.publishers),
                "--messages",
                str(args.messages),
                "--window",
                str(args.window),
            ],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lib.raise_nofile,
        )
        pub_result = json.loads(pub.stdout.readline())  # type: ignore[union-attr]
        sub_result = json.loads(sub.stdout.readline())  # type: ignore[union-attr]
        pub.wait(timeout=60)
        sub.wait(timeout=60)
        result = {
            "broker": name,
            **sub_result,
            "sent": pub_result["sent"],
            "acked": pub_result["acked"],
            "lost": pub_result["acked"] - sub_result["received_unique"],
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(timeout=30)
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["main", "sub", "pub"], default="main")
    parser.add_argument("--publishers", type=int, default=50)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--brokers", default="ours,stock-amqtt,mosquitto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", help="py-spy raw profile of the broker to <prefix>-<b>.txt")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--expected", type=int)
    parser.add_argument("--first", type=int, default=0, help="pub: first device index")
    parser.add_argument("--persistent", action="store_true", help="sub: clean session off")
    parser.add_argument("--filter", default="devices/+/telemetry", help="sub: what to subscribe")
    parser.add_argument("--client-id", default="bench", help="sub: MQTT client id")
    parser.add_argument("--idle", type=float, default=15.0, help="sub: stop after idle seconds")
    args = parser.parse_args()
    lib.raise_nofile()
    if args.role == "sub":
        asyncio.run(
            _subscriber(
                args.data_dir,
                args.port,
                args.expected,
                idle_s=args.idle,
                clean=not args.persistent,
                topic_filter=args.filter,
                client_id=args.client_id,
            )
        )
        return
    if args.role == "pub":
        asyncio.run(
            _publishers(
                args.data_dir, args.port, args.first, args.publishers, args.messages, args.window
            )
        )
        return
    root = lib.tmp_root("certfleet-bench-tput-")
    layout = lib.make_fleet(root, args.publishers)
    names = args.brokers.split(",")
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in names}
    for _ in range(args.repeat):  # round-robin, so load from elsewhere hits all alike
        for name in names:
            runs[name].append(run_broker(name, layout, args))
    summary = {}
    for name, results in runs.items():
        ordered = sorted(results, key=lambda r: float(r["msgs_per_s"] or 0))
        median = ordered[len(ordered) // 2]
        summary[name] = {
            "median_msgs_per_s": median["msgs_per_s"],
            "all_msgs_per_s": [r["msgs_per_s"] for r in results],
            "median_run_p50_ms": median["p50_ms"],
            "median_run_p99_ms": median["p99_ms"],
            "lost_total": sum(int(r["lost"]) for r in results),  # type: ignore[call-overload]
        }
    print(
        json.dumps(
            {
                "machine": lib.lscpu_model(),
                "publishers": args.publishers,
                "messages_each": args.messages,
                "window": args.window,
                "repeat": args.repeat,
                "summary": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
