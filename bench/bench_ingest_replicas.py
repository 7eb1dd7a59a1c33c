"""Benchmark: telemetry ingest with one and with two registry replicas (issue 24). JSON out.

    flock /tmp/certfleet-cpu.lock .venv/bin/python bench/bench_ingest_replicas.py --replica-cpu 0.1

Each replica is the registry's own ingest (:class:`registry.telemetry.TelemetryIngest`: a
paho subscriber in the shared group ``registry-telemetry``, JSON parse, the per-device
buffer and its batched UPDATE, on the SQLite database of the data folder, migrated with
``certfleet registry migrate``), in its own process and, with ``--replica-cpu C``, in its own
CPU cgroup of C CPUs (bench/cpu_cgroups.py, root; one machine per replica, as
bench_cluster.py does for broker nodes). Our broker runs as one node outside the groups, so
the replicas are the limit. Device publishers are bench_broker_throughput.py's (QoS 1,
``devices/<id>/telemetry``, the reading's ``device_id`` matching its topic).

Reported per shape (medians of ``--repeat`` runs, one and two replicas alternating):
readings accepted per second over all replicas (first to last accepted), each replica's
share, the replicas' CPU per reading, lost (acknowledged to the publishers minus accepted),
duplicates (accepted more than once across replicas: each replica counts what it
accepted); ``ingest_two_over_one``.
The devices are not registered: the batched UPDATE runs, and matches no row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_broker_throughput as tput  # noqa: E402
import broker_bench_lib as lib  # noqa: E402
import cpu_cgroups  # noqa: E402

#: How often a replica looks at its ingest counters.
POLL_S = 0.005


def _replica(data_dir: Path, port: int, name: str, idle_s: float) -> None:
    """One registry replica's ingest until ``idle_s`` after its last accepted reading."""
    from registry.db import make_engine
    from registry.settings import RegistrySettings
    from registry.telemetry import TelemetryIngest

    settings = RegistrySettings(
        data_dir=data_dir,
        telemetry_broker_addr=f"127.0.0.1:{port}",
        registry_instance=name,
        registry_renewal_enabled=False,
    )
    engine = make_engine(settings)
    ingest = TelemetryIngest(settings, engine).start()
    if not ingest.subscribed.wait(30):
        raise SystemExit(f"replica {name}: not subscribed")
    print(json.dumps({"subscribed": name}), flush=True)
    cpu_start = time.process_time()  # every thread of this replica
    counters = ingest.counters
    seen, first, last = 0, None, time.time()
    started = time.monotonic()
    while True:
        time.sleep(POLL_S)
        accepted = counters.accepted
        now = time.time()
        if accepted != seen:
            seen, last = accepted, now
            first = first or now
        elif first is None:
            if time.monotonic() - started > tput.FIRST_MESSAGE_WAIT_S:
                break
        elif now - last > idle_s:
            break
    ingest.stop_sync()
    cpu_s = time.process_time() - cpu_start
    result = {
        "cpu_s": round(cpu_s, 3),
        "replica": name,
        "received": counters.received,
        "accepted": counters.accepted,
        "rejected": sum(counters.rejected.values()),
        "flush_errors": counters.flush_errors,
        "first_ts": first,
        "last_ts": last if first else None,
    }
    print(json.dumps(result), flush=True)


def _run(layout: lib.DataLayout, args: argparse.Namespace, replicas: int) -> dict[str, Any]:
    broker = lib.start_ours(layout)
    groups: list[cpu_cgroups.CpuGroup] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        for index in range(replicas):
            argv = [
                sys.executable, __file__, "--role", "replica", "--data-dir", str(layout.root),
                "--port", str(broker.port), "--name", f"r{index + 1}",
            ]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=lib.REPO)
            procs.append(proc)
            if args.replica_cpu is not None:
                group = cpu_cgroups.CpuGroup(f"certfleet-ingest-{proc.pid}", args.replica_cpu)
                group.add(proc.pid)
                groups.append(group)
        for proc in procs:
            assert proc.stdout is not None
            json.loads(proc.stdout.readline())  # subscribed
        pub_argv = [
            sys.executable, tput.__file__, "--role", "pub", "--data-dir", str(layout.root),
            "--port", str(broker.port), "--publishers", str(args.publishers),
            "--messages", str(args.messages), "--window", str(args.window),
        ]  # fmt: skip
        pub = subprocess.Popen(
            pub_argv, stdout=subprocess.PIPE, text=True, preexec_fn=lib.raise_nofile
        )
        assert pub.stdout is not None
        acked = int(json.loads(pub.stdout.readline())["acked"])
        results = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        for proc in (pub, *procs):
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        broker.stop()
        for group in groups:
            group.remove()
    accepted = sum(int(r["accepted"]) for r in results)
    firsts = [r["first_ts"] for r in results if r["first_ts"] is not None]
    lasts = [r["last_ts"] for r in results if r["last_ts"] is not None]
    span = max(lasts) - min(firsts) if firsts else 0.0
    return {
        "replicas": replicas,
        "acked": acked,
        "accepted": accepted,
        "per_replica": [int(r["accepted"]) for r in results],
        "lost": max(acked - accepted, 0),
        "duplicates": max(accepted - acked, 0),
        "rejected": sum(int(r["rejected"]) for r in results),
        "flush_errors": sum(int(r["flush_errors"]) for r in results),
        "readings_per_s": round(accepted / span, 0) if span else None,
        # Each replica's CPU from its SUBACK to its exit (its idle polling included).
        "replica_cpu_us_per_reading": round(
            sum(float(r["cpu_s"]) for r in results) / max(accepted, 1) * 1e6, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["main", "replica"], default="main")
    parser.add_argument("--publishers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--replica-cpu", type=float, help="each replica in its own CPU cgroup of this many CPUs"
    )
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--name", default="r1")
    parser.add_argument("--idle", type=float, default=3.0, help="replica: stop after idle s")
    args = parser.parse_args()
    if args.role == "replica":
        _replica(args.data_dir, args.port, args.name, args.idle)
        return
    if args.replica_cpu is not None and (why := cpu_cgroups.available()) is not None:
        print(json.dumps({"skipped": f"--replica-cpu needs CPU cgroups: {why}"}), flush=True)
        return
    lib.raise_nofile()
    root = lib.tmp_root("certfleet-bench-ingest-")
    layout = lib.make_fleet(root, args.publishers, services=("bench", "registry"))
    migrate = [
        sys.executable,
        "-m",
        "certfleet.cli",
        "registry",
        "migrate",
        "--data-dir",
        str(root),
    ]
    subprocess.run(migrate, check=True, cwd=lib.REPO, stdout=subprocess.DEVNULL)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for _ in range(args.repeat):  # alternating, so outside load hits both alike
        for count in (1, 2):
            runs[count].append(_run(layout, args, count))
            print(json.dumps(runs[count][-1]), file=sys.stderr, flush=True)
    out: dict[str, Any] = {"machine": lib.lscpu_model(), "args": vars(args)}
    for count, results in runs.items():
        ordered = sorted(results, key=lambda r: float(r["readings_per_s"] or 0))
        out[f"replicas_{count}"] = {
            **ordered[len(ordered) // 2],
            "all_readings_per_s": [r["readings_per_s"] for r in results],
        }
    one = out["replicas_1"]["readings_per_s"] or 0
    two = out["replicas_2"]["readings_per_s"] or 0
    out["ingest_two_over_one"] = round(two / one, 2) if one else None
    out["lost"] = sum(int(r["lost"]) for results in runs.values() for r in results)
    out["duplicates"] = sum(int(r["duplicates"]) for results in runs.values() for r in results)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
