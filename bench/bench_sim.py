"""Simulator benchmark: how many devices one process drives, and what a connect costs the loop.

Scenarios (run each under ``flock /tmp/certfleet-bench.lock``; each stays under 5 minutes):

- ``blocking-connect``: paho's own ``connect()`` (TCP + TLS handshake, blocking) for N
  devices one after another: the time each call would stall an event loop shared by every
  device. This is what the simulator avoids by stepping the handshake on the loop.
- ``one-process``: N devices (default 2,500) at 1 message/s, QoS 1, all in ONE worker process.
  Reports the worker's CPU (process time / wall time) during steady publishing and over the
  whole run, the connect ramp, the event-loop lag and the latency percentiles.
- ``fleet``: N devices (default 10,000) spread over K worker processes.
- ``ingest``: N devices (default 2,500) publishing while the registry's telemetry ingest
  (``registry/telemetry.py``) subscribes to all of them and batches last-seen writes into
  SQLite: does the ingest keep up, and what do the batched writes cost?

Brokers: ``ours`` (``certfleet broker serve``) or ``mosquitto`` (the peer, require_certificate),
both started here as separate processes on ephemeral ports and stopped by PID.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_sim.py one-process --broker ours
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import paho.mqtt.client as mqtt  # noqa: E402
from broker_bench_lib import (  # noqa: E402
    BrokerProcess,
    lscpu_model,
    raise_nofile,
    rss_kib,
    start_mosquitto,
    start_ours,
)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from device_sim.bundle import discover_bundles  # noqa: E402
from device_sim.device import DeviceConfig  # noqa: E402
from device_sim.runner import SimRun  # noqa: E402
from fleetcore.layout import DataLayout  # noqa: E402
from fleetcore.tls import client_context  # noqa: E402

FLEET_DIR = Path(os.environ.get("CERTFLEET_BENCH_SIM_FLEET", "/tmp/certfleet-bench-sim-fleet"))


def certfleet(*args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "certfleet.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if completed.returncode != 0:
        raise SystemExit(f"certfleet {' '.join(args)} failed: {completed.stderr}")
    return completed.stdout


def ensure_fleet(devices: int) -> DataLayout:
    """A data folder with ``devices`` bundles made by the real factory (cached across runs)."""
    layout = DataLayout(FLEET_DIR)
    have = len(list(layout.devices_dir.iterdir())) if layout.devices_dir.exists() else 0
    if have >= devices:
        return layout
    if not layout.root_cert.exists():
        shutil.rmtree(FLEET_DIR, ignore_errors=True)
        certfleet("ca", "init", "--data-dir", str(FLEET_DIR), "--trust-domain", "fleet.bench")
        certfleet(
            "ca",
            "issue-server",
            "--name",
            "broker",
            "--ip",
            "127.0.0.1",
            "--dns",
            "localhost",
            "--data-dir",
            str(FLEET_DIR),
        )
    started = time.monotonic()
    certfleet(
        "factory", "provision", "--count", str(devices), "--data-dir", str(FLEET_DIR), "--json"
    )
    print(f"provisioned {devices} bundles in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return layout


def start_broker(kind: str, layout: DataLayout) -> BrokerProcess:
    if kind == "ours":
        return start_ours(layout, extra_env={"CERTFLEET_BROKER_METRICS_ADDR": "127.0.0.1:0"})
    return start_mosquitto(layout)


def blocking_connect(layout: DataLayout, broker: BrokerProcess, devices: int) -> dict[str, Any]:
    """paho connect() per device, sequentially: the stall each would put on a shared loop."""
    bundles = discover_bundles(layout.root, devices)
    durations = []
    for bundle in bundles:
        context = client_context(bundle.root, bundle.cert, bundle.key)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=bundle.device_id)
        client.tls_set_context(context)
        started = time.perf_counter()
        client.connect("127.0.0.1", broker.port)  # TCP + TLS handshake, blocking
        durations.append(time.perf_counter() - started)
        sock = client.socket()
        if sock is not None:
            sock.close()
    durations.sort()

    def pct(q: float) -> float:
        return round(durations[min(len(durations) - 1, int(len(durations) * q))] * 1000, 2)

    return {
        "scenario": "blocking-connect",
        "devices": devices,
        "blocking_connect_ms": {
            "p50": pct(0.5),
            "p95": pct(0.95),
            "p99": pct(0.99),
            "max": round(durations[-1] * 1000, 2),
        },
        "connects_per_s": round(len(durations) / sum(durations), 1),
    }


def simulate(
    layout: DataLayout,
    broker: BrokerProcess,
    devices: int,
    workers: int,
    duration: float,
    rate: float,
    concurrency: int,
) -> dict[str, Any]:
    bundles = discover_bundles(layout.root, devices)
    config = DeviceConfig("127.0.0.1", broker.port, rate=rate, qos=1)
    run = SimRun(
        bundles, config, duration=duration, workers=workers, connect_concurrency=concurrency
    )
    ramp_s = None
    ramp_cpu = ramp_acked = 0.0
    ramp_at = 0.0
    broker_rss_peak = workers_rss_peak = 0
    with run:
        while not run.wait(0.5):
            stats = run.snapshot()
            broker_rss_peak = max(broker_rss_peak, rss_kib(broker.pid))
            with contextlib.suppress(OSError, RuntimeError):  # a worker may be exiting
                workers_rss_peak = max(
                    workers_rss_peak, sum(rss_kib(pid) for pid in run.worker_pids)
                )
            if ramp_s is None and stats.connected >= devices:
                ramp_s = run.elapsed
                ramp_at, ramp_cpu, ramp_acked = time.monotonic(), stats.cpu_seconds, stats.acked
        end = run.snapshot()
        ended_at = time.monotonic()
    summary = run.summary()
    steady = None
    if ramp_s is not None:
        # Last report before the devices drain: the steady window ends with the run.
        window = max(ended_at - ramp_at, 1e-6)
        steady = {
            "seconds": round(window, 1),
            "worker_cpu_cores": round((end.cpu_seconds - ramp_cpu) / window, 3),
            "acked_per_s": round((end.acked - ramp_acked) / window, 1),
        }
    return {
        "scenario": "fleet" if workers > 1 else "one-process",
        "broker": broker.name,
        "devices": devices,
        "workers": workers,
        "rate": rate,
        "duration_s": duration,
        "connect_concurrency": concurrency,
        "connect_ramp_s": None if ramp_s is None else round(ramp_s, 1),
        "steady": steady,
        "broker_rss_peak_mib": round(broker_rss_peak / 1024, 1),
        "sim_workers_rss_peak_mib": round(workers_rss_peak / 1024, 1),
        "sim_kib_per_device": round(workers_rss_peak / devices, 1),
        "summary": summary,
    }


def ingest(
    layout: DataLayout, broker: BrokerProcess, devices: int, duration: float, rate: float
) -> dict[str, Any]:
    """The registry's ingest subscribed while the fleet publishes; SQLite in a temp folder."""
    import tempfile

    from sqlmodel import Session

    from registry.certs import parse_device_certificate
    from registry.db import make_engine, migrate
    from registry.settings import RegistrySettings
    from registry.store import audit, devices
    from registry.telemetry import TelemetryIngest

    if not layout.client_cert("registry").exists():
        certfleet("ca", "issue-client", "--service", "registry", "--data-dir", str(layout.root))
    from factory.ca import CertificateAuthority

    ca = CertificateAuthority.load(layout)
    db_dir = Path(tempfile.mkdtemp(prefix="certfleet-bench-ingest-"))
    settings = RegistrySettings(
        data_dir=layout.root,
        registry_database_url=f"sqlite:///{db_dir / 'registry.db'}",
        telemetry_broker_addr=f"127.0.0.1:{broker.port}",
    )
    engine = make_engine(settings)
    migrate(engine)
    bundles = discover_bundles(layout.root, devices)
    registrations = [
        devices.Registration(
            parse_device_certificate(
                bundle.cert.read_text(), issuing_cert=ca.issuing_cert, trust_domain=ca.trust_domain
            )
        )
        for bundle in bundles
    ]
    with Session(engine) as session:
        devices.register_devices(session, registrations, audit.Actor("bench"))
    subscriber = TelemetryIngest(settings, engine).start()
    try:
        if not subscriber.connected.wait(30):
            raise SystemExit("the ingest did not connect to the broker")
        ingest_cpu_started = time.process_time()
        started = time.monotonic()
        result = simulate(layout, broker, devices, 1, duration, rate, 64)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 30
        acked = result["summary"]["messages_acknowledged"]
        while subscriber.counters.received < acked and time.monotonic() < deadline:
            time.sleep(0.1)
        bench_cpu = time.process_time() - ingest_cpu_started
    finally:
        subscriber.stop_sync()
        engine.dispose()
        shutil.rmtree(db_dir, ignore_errors=True)
    counters = subscriber.counters
    result["scenario"] = "ingest"
    result["ingest"] = {
        "received": counters.received,
        "accepted": counters.accepted,
        "rejected": dict(counters.rejected),
        "received_of_acked": round(counters.received / max(acked, 1), 4),
        "received_per_s": round(counters.received / elapsed, 1),
        "flushes": counters.flushes,
        "rows_written": counters.rows_written,
        "flush_mean_ms": round(counters.flush_seconds_total / max(counters.flushes, 1) * 1000, 2),
        "flush_max_ms": round(counters.flush_seconds_max * 1000, 2),
        "flush_busy_share": round(counters.flush_seconds_total / elapsed, 4),
        "bench_process_cpu_cores": round(bench_cpu / elapsed, 3),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["blocking-connect", "one-process", "fleet", "ingest"])
    parser.add_argument("--broker", choices=["ours", "mosquitto"], default="ours")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    raise_nofile()
    defaults = {"blocking-connect": 300, "one-process": 2500, "fleet": 10_000, "ingest": 2500}
    devices = args.devices or defaults[args.scenario]
    layout = ensure_fleet(max(devices, 2500))
    broker = start_broker(args.broker, layout)
    try:
        if args.scenario == "blocking-connect":
            result = blocking_connect(layout, broker, devices)
            result["broker"] = broker.name
        elif args.scenario == "ingest":
            result = ingest(layout, broker, devices, args.duration, args.rate)
        else:
            workers = args.workers or (1 if args.scenario == "one-process" else 4)
            result = simulate(
                layout, broker, devices, workers, args.duration, args.rate, args.concurrency
            )
    finally:
        broker.stop()
    result["machine"] = f"{os.cpu_count()} cores, {lscpu_model()}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
