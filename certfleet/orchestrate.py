"""`certfleet demo` and `certfleet up`: start the parts together."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["register"]


def demo(
    devices: Annotated[
        int | None, typer.Option("--devices", help="devices to provision and run [1000]")
    ] = None,
    demo_dir: Annotated[
        Path | None,
        typer.Option("--demo-dir", help="demo folder, wiped each run [<data-dir>/demo]"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="certfleet data folder [./certfleet-data]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="simulator worker processes")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the checks and facts as JSON on stdout")
    ] = False,
) -> None:
    """Run the whole system end to end and prove revocation cuts a live device off."""
    from certfleet.demo import render_result, run_demo
    from certfleet.procs import terminate_on_sigterm
    from certfleet.settings import build_settings

    settings = build_settings(
        data_dir=data_dir, demo_dir=demo_dir, demo_devices=devices, demo_workers=workers
    )
    console = Console(stderr=as_json)
    with terminate_on_sigterm():
        result = run_demo(settings, console)
    render_result(result, console)
    if as_json:
        body = {
            "ok": result.ok,
            "checks": [vars(check) for check in result.checks],
            "facts": result.facts,
        }
        sys.stdout.write(json.dumps(body, indent=2, default=str) + "\n")
    if not result.ok:
        console.print("[red]certfleet demo: FAILED[/red]")
        raise typer.Exit(1)
    console.print("[green]certfleet demo: every check passed[/green]")


def up(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="certfleet data folder [./certfleet-data]")
    ] = None,
    registry_addr: Annotated[
        str | None,
        typer.Option("--registry-addr", help="registry host:port [127.0.0.1:8443]"),
    ] = None,
    broker_addr: Annotated[
        str | None, typer.Option("--broker-addr", help="broker host:port [127.0.0.1:8883]")
    ] = None,
    brokers: Annotated[
        int | None,
        typer.Option(
            "--brokers",
            help="broker nodes sharing the broker port, clustered on NATS "
            "(CERTFLEET_UP_BROKERS) [1]",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            help="NATS URL of the cluster (CERTFLEET_BROKER_CLUSTER_URL); without it, "
            "--brokers N>1 runs a local nats-server in the data folder",
        ),
    ] = None,
) -> None:
    """Start the registry and the broker (or N broker nodes) together until Ctrl-C."""
    from certfleet.procs import terminate_on_sigterm
    from certfleet.settings import build_settings
    from certfleet.up import run_up

    settings = build_settings(
        data_dir=data_dir,
        registry_addr=registry_addr,
        broker_addr=broker_addr,
        up_brokers=brokers,
        broker_cluster_url=cluster,
    )
    with terminate_on_sigterm():
        result = run_up(settings, Console())
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    """Add the orchestration commands to the root app."""
    app.command("demo")(demo)
    app.command("up")(up)
