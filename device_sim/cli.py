"""`certfleet sim` commands."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

from device_sim.bundle import DeviceBundle, discover_bundles
from device_sim.device import DeviceConfig
from device_sim.errors import SimError
from device_sim.progress import watch
from device_sim.renew import renew_bundle
from device_sim.runner import SimRun
from device_sim.settings import build_settings, parse_addr
from fleetcore.keys import KEY_ALGORITHMS

app = typer.Typer(help="Simulated devices publishing telemetry over mTLS.", no_args_is_help=True)

DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="certfleet data folder")]
BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker", help="broker host:port (default: CERTFLEET_BROKER_ADDR or device.json)"
    ),
]


@app.command("run")
def run(
    data_dir: DataDirOption = None,
    broker: BrokerOption = None,
    devices: Annotated[
        int | None, typer.Option("--devices", min=1, help="run the first N bundles")
    ] = None,
    all_devices: Annotated[
        bool, typer.Option("--all", help="run every bundle in the data folder")
    ] = False,
    rate: Annotated[
        float | None, typer.Option("--rate", help="readings per second per device")
    ] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="seconds to publish")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="worker processes (0 = in this process; default 1 per 2,500)"
        ),
    ] = None,
    qos: Annotated[int | None, typer.Option("--qos", help="0 or 1 (default 1)")] = None,
    connect_concurrency: Annotated[
        int | None,
        typer.Option("--connect-concurrency", help="connection attempts in flight per worker"),
    ] = None,
    window: Annotated[
        int | None, typer.Option("--window", help="unacked readings kept per device")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="seed for jitter and sensor values")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print only the JSON summary on stdout")
    ] = False,
) -> None:
    """Run simulated devices from their bundles and print a summary at the end."""
    if devices is not None and all_devices:
        raise SimError("pass either --devices N or --all, not both")
    settings = build_settings(
        data_dir=data_dir,
        broker_addr=broker,
        sim_devices=devices,
        sim_rate=rate,
        sim_duration=duration,
        sim_workers=workers,
        sim_qos=qos,
        sim_connect_concurrency=connect_concurrency,
        sim_window=window,
    )
    limit = None if all_devices else settings.sim_devices
    bundles = discover_bundles(settings.data_dir, limit)
    address = settings.broker_addr or bundles[0].broker
    if address is None:
        raise SimError("no broker address: pass --broker host:port")
    host, port = parse_addr(address)
    config = DeviceConfig(
        host,
        port,
        rate=settings.sim_rate,
        qos=settings.sim_qos,
        keepalive=settings.sim_keepalive,
        connect_timeout=settings.sim_connect_timeout,
        backoff_base=settings.sim_backoff_base,
        backoff_cap=settings.sim_backoff_cap,
        window=settings.sim_window,
    )
    console = Console(stderr=True)
    sim = SimRun(
        bundles,
        config,
        duration=settings.sim_duration,
        workers=settings.sim_workers,
        connect_concurrency=settings.sim_connect_concurrency,
        seed=seed,
        uvloop=settings.sim_uvloop,
    )

    def interrupted(signum: int, frame: FrameType | None) -> None:
        console.print("stopping: devices drain and disconnect (Ctrl-C again to force)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sim.stop()

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        with sim:
            if as_json or not console.is_terminal:
                sim.wait()
            else:
                watch(sim, console)
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = sim.summary()
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        Console().print_json(json.dumps(summary))
    if summary["errors"] or summary["devices_connected_ever"] == 0:
        raise typer.Exit(1)


@app.command("renew")
def renew(
    device: Annotated[str, typer.Option("--device", help="device id whose bundle to renew")],
    data_dir: DataDirOption = None,
    broker: BrokerOption = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="seconds to wait for the answer")
    ] = 30.0,
    key_algorithm: Annotated[
        str, typer.Option("--key-algorithm", help=f"one of {', '.join(KEY_ALGORITHMS)}")
    ] = "p256",
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Renew one device's certificate over MQTT (new key, CSR, answer from the registry)."""
    settings = build_settings(data_dir=data_dir, broker_addr=broker)
    directory = settings.data_dir / "devices" / device
    if not directory.is_dir():
        raise SimError(f"no bundle for device {device!r} in {settings.data_dir / 'devices'}")
    address = settings.broker_addr or DeviceBundle.load(directory).broker
    if address is None:
        raise SimError("no broker address: pass --broker host:port")
    host, port = parse_addr(address)
    result = renew_bundle(directory, host, port, timeout=timeout, key_algorithm=key_algorithm)
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    else:
        Console().print(
            f"renewed {result.device_id}: serial {result.serial} "
            f"(was {result.previous_serial}), valid until {result.not_after}"
        )
