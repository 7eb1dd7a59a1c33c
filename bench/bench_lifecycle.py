"""Benchmark: the renewal storm (issue 14), with and without an expiry stagger, beside the
registry's renewal capacity.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_lifecycle.py

The recorded configuration (the defaults): 2,000 devices, certificate lifetime 4 minutes,
staggers 0 and 2 minutes, 10 minutes each: about 21 minutes in all. Each run is
`certfleet sim lifecycle` (certfleet/lifecycle_run.py): its own CA, registry, broker and
simulated fleet as real processes on loopback. Then the registry's renewal capacity is
measured by bench/bench_renewal.py's burst (200 CSRs from 100 devices at once, certificates back
per second), so that the peak can be read against what the registry can sign.

Prints one JSON object: the lifecycle runs (the `--json` schema of `certfleet sim lifecycle`),
the capacity, and how much lower the peak is with the largest stagger; writes the chart to
bench/results/lifecycle.png and the JSON to bench/results/lifecycle.json.

Smoke run (about two minutes):

    .venv/bin/python bench/bench_lifecycle.py --devices 50 --lifetime 60s --stagger 0,20s \
        --duration 60s --capacity-burst 200 --out /tmp/lifecycle-smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from certfleet.lifecycle_cli import parse_seconds, parse_staggers
from certfleet.lifecycle_report import LiveProgress, lifecycle_json, write_png
from certfleet.lifecycle_run import LifecyclePlan, run_lifecycle

HERE = Path(__file__).resolve().parent


def renewal_capacity(burst: int) -> dict[str, object]:
    """bench_renewal.py's burst: renewals per second the registry answers when CSRs queue."""
    devices = max(1, burst // 2)
    argv = [sys.executable, str(HERE / "bench_renewal.py"), "--round-trips", "1"]
    argv += ["--burst", str(burst), "--burst-devices", str(devices), "--renewer", str(burst)]
    completed = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    measured = json.loads(completed.stdout)
    return {
        "burst_csrs": burst,
        "renewals_per_s": measured["burst"]["renewals_per_s"],
        "renewer_alone_per_s": measured["renewer_alone"]["renewals_per_s"],
        "how": "bench/bench_renewal.py --burst: CSRs published at once over MQTT by "
        f"{devices} devices; broker, registry and devices in one process",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--lifetime", default="4m")
    parser.add_argument("--stagger", default="0,2m")
    parser.add_argument("--duration", default="10m")
    parser.add_argument("--workers", type=int, default=None)
    # 200 CSRs from 100 devices: at 500 devices one did not subscribe within 15 s (round 3).
    parser.add_argument("--capacity-burst", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    args = parser.parse_args()

    plan = LifecyclePlan(
        devices=args.devices,
        lifetime_s=parse_seconds(args.lifetime, what="--lifetime"),
        staggers_s=parse_staggers(args.stagger),
        duration_s=parse_seconds(args.duration, what="--duration"),
        workers=args.workers,
    )
    console = Console(stderr=True)
    with LiveProgress(plan, console) as progress:
        runs = run_lifecycle(plan, progress)
    png = write_png(plan, runs, args.out / "lifecycle.png")
    body = lifecycle_json(runs, png)
    body["config"] = {
        "devices": plan.devices,
        "lifetime_s": plan.lifetime_s,
        "staggers_s": list(plan.staggers_s),
        "duration_s": plan.duration_s,
        "grace_s": plan.grace,
    }
    first, last = runs[0].figures, runs[-1].figures
    if len(runs) > 1 and first.peak_renewals_per_s > 0:
        body["peak_with_stagger_vs_without"] = round(
            last.peak_renewals_per_s / first.peak_renewals_per_s, 3
        )
    # The runs are written before the capacity step: a failure there must not lose them.
    (args.out / "lifecycle.json").write_text(json.dumps(body, indent=2) + "\n")
    try:
        body["registry_renewal_capacity"] = renewal_capacity(args.capacity_burst)
    except (subprocess.SubprocessError, ValueError, KeyError) as exc:
        body["registry_renewal_capacity"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    text = json.dumps(body, indent=2)
    (args.out / "lifecycle.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
