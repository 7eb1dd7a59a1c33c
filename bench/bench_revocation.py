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
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broker_bench_lib as lib  # noqa: E402

from fleetcore.tls import service_client_context


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
    args = parser.parse_args()
    lib.raise_nofile()

    root = lib.tmp_root("certfleet-bench-revoke-")
    layout = lib.make_fleet(root, args.devices, services=("broker",))
    lib.issue_operator(layout)
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
        workers = lib.spawn_device_workers(
            lib.__file__, root, broker.port, args.devices, args.procs
        )
        watcher = lib.DropWatcher(workers)
        connected = watcher.connected
        print(f"# {connected}/{args.devices} devices connected; revoking {args.revoke}", flush=True)
        victims = random.Random(4).sample(range(args.devices), args.revoke)
        latencies, missed = lib.time_drops(http, watcher, [lib.device_id(i) for i in victims])
        latencies.sort()
        collateral = len(watcher.closed_names() - {lib.device_id(i) for i in victims})

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
        lib.stop_workers(workers)
        if broker is not None:
            broker.stop()
        registry.terminate()
        registry.wait(timeout=30)


if __name__ == "__main__":
    main()
