"""`certfleet sim lifecycle`: the renewal storm, measured (docs/lifecycle.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fleetcore.errors import ConfigError

__all__ = ["lifecycle", "parse_seconds", "parse_staggers"]


def parse_seconds(text: str, *, what: str, allow_zero: bool = False) -> int:
    """``240``, ``240s``, ``4m`` -> whole seconds (a bare number is seconds)."""
    from fleetcore.duration import parse_duration

    cleaned = text.strip()
    if cleaned.isdigit():
        cleaned += "s"
    return int(parse_duration(cleaned, what=what, allow_zero=allow_zero).total_seconds())


def parse_staggers(text: str) -> tuple[int, ...]:
    """``0,2m`` -> (0, 120): one run per value, in the order given, no repeats."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError("--stagger needs at least one value, e.g. --stagger 0,2m")
    values = tuple(parse_seconds(part, what="--stagger", allow_zero=True) for part in parts)
    if len(set(values)) != len(values):
        raise ConfigError(f"--stagger {text!r} names a value twice")
    return values


def lifecycle(
    devices: Annotated[
        int | None, typer.Option("--devices", help="devices in the fleet [200]")
    ] = None,
    lifetime: Annotated[
        str | None, typer.Option("--lifetime", help="certificate lifetime, e.g. 4m or 240 [4m]")
    ] = None,
    stagger: Annotated[
        str | None,
        typer.Option("--stagger", help="expiry stagger windows, one run each, e.g. 0,2m [0,2m]"),
    ] = None,
    duration: Annotated[
        str | None, typer.Option("--duration", help="length of each run, e.g. 10m [10m]")
    ] = None,
    grace: Annotated[
        str | None,
        typer.Option("--grace", help="grace before superseded certificates are revoked [5% of L]"),
    ] = None,
    rate: Annotated[
        float | None, typer.Option("--rate", help="telemetry readings/s per device [0.1]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="simulator worker processes")
    ] = None,
    png: Annotated[
        Path | None, typer.Option("--png", help="write the renewal-rate chart to this PNG")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="folder for the runs' temporary data")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="keep each run's data folder (logs, registry.db)")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object on stdout")
    ] = False,
) -> None:
    """Run a compressed fleet life once per stagger value and measure the renewal storm."""
    from certfleet.lifecycle_report import LiveProgress, lifecycle_json, render_table, write_png
    from certfleet.lifecycle_run import LifecyclePlan, run_lifecycle
    from certfleet.procs import terminate_on_sigterm
    from certfleet.settings import build_settings

    settings = build_settings(
        lifecycle_devices=devices,
        lifecycle_lifetime=lifetime,
        lifecycle_staggers=stagger,
        lifecycle_duration=duration,
        lifecycle_grace=grace,
        lifecycle_rate=rate,
        lifecycle_workers=workers,
    )
    lifetime_s = parse_seconds(settings.lifecycle_lifetime, what="--lifetime")
    grace_s = (
        None
        if settings.lifecycle_grace is None
        else parse_seconds(settings.lifecycle_grace, what="--grace", allow_zero=True)
    )
    if grace_s is not None and grace_s >= lifetime_s:
        raise ConfigError(f"--grace ({grace_s} s) must be shorter than --lifetime ({lifetime_s} s)")
    plan = LifecyclePlan(
        devices=settings.lifecycle_devices,
        lifetime_s=lifetime_s,
        staggers_s=parse_staggers(settings.lifecycle_staggers),
        duration_s=parse_seconds(settings.lifecycle_duration, what="--duration"),
        grace_s=grace_s,
        rate=settings.lifecycle_rate,
        workers=settings.lifecycle_workers,
        work_dir=work_dir,
        keep=keep,
    )
    console = Console(stderr=as_json)
    with terminate_on_sigterm(), LiveProgress(plan, console) as progress:
        runs = run_lifecycle(plan, progress)
    written = write_png(plan, runs, png) if png is not None else None
    if as_json:
        sys.stdout.write(json.dumps(lifecycle_json(runs, written), indent=2) + "\n")
    else:
        render_table(plan, runs, console)
        if written is not None:
            console.print(f"chart: {written}")
