"""Benchmark: N concurrent mTLS device connections held; broker RSS per connection.

    flock /tmp/certfleet-bench.lock python bench/bench_broker_conn.py --devices 10000

For each broker (ours, stock amqtt 0.12.1, Mosquitto): start it, measure its idle RSS,
open N device connections (TLS with the device's own certificate, then MQTT CONNECT with
client id = device id; wait for CONNACK 0) from 2 client processes, hold them, measure the
broker's RSS again. Per-connection memory = (RSS held - RSS idle) / N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broker_bench_lib as lib  # noqa: E402


async def _hold(data_dir: Path, port: int, start: int, end: int, concurrency: int) -> None:
    layout = lib.DataLayout(data_dir)
    semaphore = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    held: list[lib.TlsClient] = []
    failed = 0

    async def one(index: int) -> None:
        nonlocal failed
        async with semaphore:
            try:
                client = await lib.connect_device(layout, port, index)
                held.append(client)
            except (OSError, TimeoutError, ConnectionError):
                failed += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(start, end)))
    elapsed = time.monotonic() - t0
    print(json.dumps({"ok": len(held), "failed": failed, "seconds": elapsed}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # hold until the parent closes stdin
    for client in held:
        if client.transport is not None:
            client.transport.close()


def run_broker(name: str, layout: lib.DataLayout, devices: int, procs: int) -> dict[str, object]:
    starter = {
        "ours": lib.start_ours,
        "stock-amqtt": lib.start_stock,
        "mosquitto": lib.start_mosquitto,
    }[name]
    broker = starter(layout)
    try:
        time.sleep(1.0)  # let the process finish importing/allocating before the idle sample
        idle = lib.rss_kib(broker.pid)
        t0 = time.monotonic()
        workers = lib.spawn_device_workers(__file__, layout.root, broker.port, devices, procs)
        reports = [json.loads(w.stdout.readline()) for w in workers]  # type: ignore[union-attr]
        connect_seconds = time.monotonic() - t0
        ok = sum(int(r["ok"]) for r in reports)
        time.sleep(2.0)  # settle: let the broker finish per-session setup
        held = lib.rss_kib(broker.pid)
        alive = broker.process.poll() is None
        for w in workers:
            w.stdin.close()  # type: ignore[union-attr]
            w.wait(timeout=120)
        result = {
            "broker": name,
            "devices": devices,
            "connected": ok,
            "failed": sum(int(r["failed"]) for r in reports),
            "connect_seconds": round(connect_seconds, 1),
            "connects_per_s": round(ok / connect_seconds, 0) if connect_seconds else None,
            "rss_idle_mib": round(idle / 1024, 1),
            "rss_held_mib": round(held / 1024, 1),
            "kib_per_connection": round((held - idle) / ok, 1) if ok else None,
            "broker_alive": alive,
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--brokers", default="ours,stock-amqtt,mosquitto")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--start", type=int)
    parser.add_argument("--end", type=int)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    lib.raise_nofile()
    if args.worker:
        asyncio.run(_hold(args.data_dir, args.port, args.start, args.end, args.concurrency))
        return
    root = lib.tmp_root("certfleet-bench-conn-")
    t0 = time.monotonic()
    layout = lib.make_fleet(root, args.devices)
    print(f"# fleet of {args.devices} minted in {time.monotonic() - t0:.1f}s at {root}", flush=True)
    results = [
        run_broker(name, layout, args.devices, args.procs) for name in args.brokers.split(",")
    ]
    print(json.dumps({"machine": lib.lscpu_model(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
