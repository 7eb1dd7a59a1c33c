"""Benchmark: decommission -> the device's socket closes, with N devices connected.

    flock /tmp/certfleet-bench.lock python bench/bench_revocation.py --devices 5000 --revoke 100

A real registry (``certfleet registry serve``, SQLite) and our broker
(``certfleet broker serve --registry-url``) as separate processes. N devices are registered
(``POST /devices/batch``) and connected over mTLS from 2 client processes, which report the
wall-clock time each socket is closed by the broker. Then K devices are decommissioned one
after another by an operator over mTLS; for each, latency = socket closed - decommission call
returned. Mosquitto and stock amqtt are not run: neither ever drops such a session
(FIELD-NOTES.md; Mosquitto reads its CRL at SIGHUP and only checks it at the next handshake).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broker_bench_lib as lib  # noqa: E402

from factory.ca import CertificateAuthority, write_issued  # noqa: E402
from fleetcore.profile import IdentityKind  # noqa: E402
from fleetcore.tls import service_client_context


async def _hold(data_dir: Path, port: int, start: int, end: int, concurrency: int) -> None:
    layout = lib.DataLayout(data_dir)
    semaphore = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    ok = failed = 0

    async def one(index: int) -> None:
        nonlocal ok, failed
        async with semaphore:
            try:
                client = await lib.connect_device(layout, port, index)
            except (OSError, TimeoutError, ConnectionError):
                failed += 1
                return
            ok += 1

            def report(_: asyncio.Future[None]) -> None:
                print(json.dumps({"closed": lib.device_id(index), "at": time.time()}), flush=True)

            client.closed.add_done_callback(report)

    await asyncio.gather(*(one(i) for i in range(start, end)))
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


def start_registry(layout: lib.DataLayout) -> tuple[subprocess.Popen[bytes], str]:
    ready = layout.root / "registry-ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "--log-level",
            "warning",
            "registry",
            "serve",
            "--data-dir",
            str(layout.root),
            "--addr",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        cwd=lib.REPO,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("registry did not start")
        time.sleep(0.1)
    return process, json.loads(ready.read_text())["url"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--revoke", type=int, default=100)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--start", type=int)
    parser.add_argument("--end", type=int)
    args = parser.parse_args()
    lib.raise_nofile()
    if args.worker:
        asyncio.run(_hold(args.data_dir, args.port, args.start, args.end, 200))
        return

    root = lib.tmp_root("certfleet-bench-revoke-")
    layout = lib.make_fleet(root, args.devices, services=("broker",))
    ca = CertificateAuthority.load(layout)
    operator = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "bench-op"))
    write_issued(operator, layout.client_cert("bench-op"), layout.client_key("bench-op"))
    registry, url = start_registry(layout)
    broker = None
    workers: list[subprocess.Popen[str]] = []
    try:
        context = service_client_context(layout, "bench-op")
        http = httpx.Client(base_url=f"{url}/api/v1", verify=context, timeout=60)
        for chunk in range(0, args.devices, 1000):
            devices = [
                {
                    "certificate_pem": lib.device_files(layout, i)[0].read_text(),
                    "hardware_serial": f"hw-{i}",
                }
                for i in range(chunk, min(chunk + 1000, args.devices))
            ]
            response = http.post("/devices/batch", json={"devices": devices})
            response.raise_for_status()
        broker = lib.start_ours(layout, registry_url=url)
        closed: dict[str, float] = {}
        lock = threading.Lock()
        workers = lib.spawn_device_workers(__file__, root, broker.port, args.devices, args.procs)
        connected = 0
        for w in workers:
            line = json.loads(w.stdout.readline())  # type: ignore[union-attr]
            connected += int(line["ok"])

        def pump(w: subprocess.Popen[str]) -> None:
            for raw in w.stdout:  # type: ignore[union-attr]
                event = json.loads(raw)
                if "closed" in event:
                    with lock:
                        closed[event["closed"]] = float(event["at"])

        for w in workers:
            threading.Thread(target=pump, args=(w,), daemon=True).start()
        print(f"# {connected}/{args.devices} devices connected; revoking {args.revoke}", flush=True)
        victims = random.Random(4).sample(range(args.devices), args.revoke)
        latencies: list[float] = []
        missed = 0
        for index in victims:
            name = lib.device_id(index)
            response = http.post(f"/devices/{name}/decommission", json={"reason": "bench"})
            returned = time.time()
            response.raise_for_status()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                with lock:
                    at = closed.get(name)
                if at is not None:
                    break
                time.sleep(0.001)
            if at is None:
                missed += 1
            else:
                latencies.append(at - returned)
        latencies.sort()
        with lock:
            collateral = len(set(closed) - {lib.device_id(i) for i in victims})

        def pct(q: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000, 1)

        result = {
            "machine": lib.lscpu_model(),
            "devices_connected": connected,
            "decommissions": args.revoke,
            "dropped_within_5s": len(latencies),
            "missed": missed,
            "other_sessions_dropped": collateral,
            "latency_ms_p50": pct(0.5) if latencies else None,
            "latency_ms_p99": pct(0.99) if latencies else None,
            "latency_ms_max": round(latencies[-1] * 1000, 1) if latencies else None,
            "latency_ms_min": round(latencies[0] * 1000, 1) if latencies else None,
        }
        print(json.dumps(result, indent=2))
        http.close()
    finally:
        for w in workers:
            if w.stdin:
                w.stdin.close()
            w.wait(timeout=60)
        if broker is not None:
            broker.stop()
        registry.terminate()
        registry.wait(timeout=30)


if __name__ == "__main__":
    main()
