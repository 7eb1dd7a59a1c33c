"""`certfleet sim` commands."""

from __future__ import annotations

import enum
import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console

from device_sim.bundle import DeviceBundle, discover_bundles
from device_sim.device import DeviceConfig
from device_sim.errors import SimError
from device_sim.est_enroll import (
    ClaimCredentials,
    EnrollmentReport,
    enroll_fleet,
    hardware_serials,
)
from device_sim.progress import watch
from device_sim.renew import renew_bundle
from device_sim.runner import SimRun
from device_sim.settings import (
    SimSettings,
    broker_list,
    build_settings,
    parse_addr,
    renewal_policy,
)
from fleetcore.keys import KEY_ALGORITHMS

app = typer.Typer(help="Simulated devices publishing telemetry over mTLS.", no_args_is_help=True)

DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="certfleet data folder")]
BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker", help="broker host:port (default: CERTFLEET_BROKER_ADDR or device.json)"
    ),
]
BrokersOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="broker host:port, or host:port,host:port,... to fail over between "
        "(default: CERTFLEET_SIM_BROKERS, CERTFLEET_BROKER_ADDR or device.json)",
    ),
]


class EnrollMode(enum.StrEnum):
    """How the simulated devices get their identity."""

    BUNDLES = "bundles"
    EST = "est"


DevicesOption = Annotated[
    int | None, typer.Option("--devices", min=1, help="run the first N bundles")
]
AllOption = Annotated[bool, typer.Option("--all", help="run every bundle in the data folder")]
RateOption = Annotated[float | None, typer.Option("--rate", help="readings per second per device")]
DurationOption = Annotated[float | None, typer.Option("--duration", help="seconds to publish")]
WorkersOption = Annotated[
    int | None,
    typer.Option("--workers", help="worker processes (0 = in this process; default 1 per 2,500)"),
]
QosOption = Annotated[int | None, typer.Option("--qos", help="0 or 1 (default 1)")]
ConnectConcurrencyOption = Annotated[
    int | None,
    typer.Option("--connect-concurrency", help="connection attempts in flight per worker"),
]
WindowOption = Annotated[
    int | None, typer.Option("--window", help="unacked readings kept per device")
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="seed for jitter and sensor values")]
RenewOption = Annotated[
    bool | None,
    typer.Option("--renew/--no-renew", help="renew certificates automatically (default on)"),
]
RenewAtOption = Annotated[
    float | None,
    typer.Option("--renew-at", help="renew at this fraction of the lifetime (default 2/3)"),
]
RenewalLogOption = Annotated[
    Path | None,
    typer.Option("--renewal-log", help="append one JSON line per renewal event to this file"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print only the JSON summary on stdout")]
EnrollOption = Annotated[
    EnrollMode,
    typer.Option(
        "--enroll", help="bundles: run the factory's bundles; est: devices first enroll by claim"
    ),
]
ClaimOption = Annotated[
    Path | None, typer.Option("--claim", help="claims/<batch>/ folder (with --enroll est)")
]
SerialsOption = Annotated[
    Path | None,
    typer.Option("--serials", help="hardware serials, one a line (with --enroll est)"),
]
SerialPrefixOption = Annotated[
    str | None,
    typer.Option("--serial-prefix", help="serials <prefix><index> when no --serials file"),
]
RegistryUrlOption = Annotated[
    str | None,
    typer.Option("--registry-url", help="registry https URL, its EST server (--enroll est)"),
]
EnrollConcurrencyOption = Annotated[
    int | None,
    typer.Option("--enroll-concurrency", help="EST enrollments in flight (default 16)"),
]


@app.command("run")
def run(
    data_dir: DataDirOption = None,
    broker: BrokersOption = None,
    devices: DevicesOption = None,
    all_devices: AllOption = False,
    rate: RateOption = None,
    duration: DurationOption = None,
    workers: WorkersOption = None,
    qos: QosOption = None,
    connect_concurrency: ConnectConcurrencyOption = None,
    window: WindowOption = None,
    seed: SeedOption = None,
    renew: RenewOption = None,
    renew_at: RenewAtOption = None,
    renewal_log: RenewalLogOption = None,
    as_json: JsonOption = False,
    enroll: EnrollOption = EnrollMode.BUNDLES,
    claim: ClaimOption = None,
    serials: SerialsOption = None,
    serial_prefix: SerialPrefixOption = None,
    registry_url: RegistryUrlOption = None,
    enroll_concurrency: EnrollConcurrencyOption = None,
) -> None:
    """Run simulated devices (from their bundles, or enrolled by claim over EST first) and
    print a summary at the end."""
    if devices is not None and all_devices:
        raise SimError("pass either --devices N or --all, not both")
    if enroll is EnrollMode.BUNDLES and (claim or serials or serial_prefix):
        raise SimError("--claim, --serials and --serial-prefix go with --enroll est")
    settings = build_settings(
        data_dir=data_dir,
        sim_brokers=broker,
        sim_devices=devices,
        sim_rate=rate,
        sim_duration=duration,
        sim_workers=workers,
        sim_qos=qos,
        sim_connect_concurrency=connect_concurrency,
        sim_window=window,
        sim_renew=renew,
        sim_renew_at=renew_at,
        sim_renewal_log=renewal_log,
        registry_url=registry_url,
        sim_enroll_concurrency=enroll_concurrency,
        sim_serial_prefix=serial_prefix,
    )
    enrollment: EnrollmentReport | None = None
    if enroll is EnrollMode.EST:
        enrollment = _enroll_by_claim(settings, claim, serials, all_devices, as_json)
        bundles = enrollment.enrolled
        if not bundles:
            _print_summary({"enrollment": enrollment.as_dict()}, as_json)
            raise typer.Exit(1)
    else:
        bundles = discover_bundles(settings.data_dir, None if all_devices else settings.sim_devices)
    summary = _run_devices(settings, bundles, seed, as_json)
    if enrollment is not None:
        summary["enrollment"] = enrollment.as_dict()
    _print_summary(summary, as_json)
    if summary["errors"] or summary["devices_connected_ever"] == 0:
        raise typer.Exit(1)


def _device_config(settings: SimSettings, bundles: list[DeviceBundle]) -> DeviceConfig:
    """How each device connects and publishes: brokers (with failover), rate, QoS, renewal."""
    address = settings.sim_brokers or settings.broker_addr or bundles[0].broker
    if address is None:
        raise SimError("no broker address: pass --broker host:port")
    first, *failover = broker_list(address)
    return DeviceConfig(
        first.host,
        first.port,
        failover=tuple(failover),
        rate=settings.sim_rate,
        qos=settings.sim_qos,
        keepalive=settings.sim_keepalive,
        connect_timeout=settings.sim_connect_timeout,
        backoff_base=settings.sim_backoff_base,
        backoff_cap=settings.sim_backoff_cap,
        window=settings.sim_window,
        renewal=renewal_policy(settings),
    )


def _run_devices(
    settings: SimSettings, bundles: list[DeviceBundle], seed: int | None, as_json: bool
) -> dict[str, Any]:
    """Run the devices until their duration ends or Ctrl-C; their summary."""
    console = Console(stderr=True)
    sim = SimRun(
        bundles,
        _device_config(settings, bundles),
        duration=settings.sim_duration,
        workers=settings.sim_workers,
        connect_concurrency=settings.sim_connect_concurrency,
        seed=seed,
        uvloop=settings.sim_uvloop,
        renewal_log=settings.sim_renewal_log,
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
    return sim.summary()


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        Console().print_json(json.dumps(summary))


def _enroll_by_claim(
    settings: SimSettings,
    claim: Path | None,
    serials_file: Path | None,
    all_devices: bool,
    as_json: bool,
) -> EnrollmentReport:
    """Enroll the devices over EST with the claim; their bundles go into the data folder."""
    if claim is None:
        raise SimError("--enroll est needs --claim claims/<batch>/")
    if settings.registry_url is None:
        raise SimError(
            "--enroll est needs the registry's URL: --registry-url or CERTFLEET_REGISTRY_URL"
        )
    broker = settings.sim_brokers or settings.broker_addr
    if broker is None:
        raise SimError("--enroll est needs --broker host:port (devices have no device.json yet)")
    if serials_file is None and (all_devices or settings.sim_devices is None):
        raise SimError("--enroll est needs --devices N or a --serials file")
    count = 0 if all_devices else settings.sim_devices or 0
    serials = hardware_serials(settings.sim_serial_prefix, count, serials_file)
    console = Console(stderr=True)
    report = enroll_fleet(
        ClaimCredentials.load(claim),
        settings.registry_url,
        serials,
        settings.data_dir,
        str(broker_list(broker)[0]),
        concurrency=settings.sim_enroll_concurrency,
        on_refused=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if not as_json:
        console.print(
            f"enrolled {len(report.enrolled)} of {len(serials)} devices by claim over EST "
            f"in {report.elapsed_s:.1f} s ({len(report.refused)} refused)"
        )
    return report


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
