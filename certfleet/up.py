"""`certfleet up`: the registry and the broker together, for real use, until Ctrl-C.

Missing server and service certificates are created from the data folder's CA (which must
exist: ``certfleet ca init``); the registry ingests telemetry from the broker, and the broker
follows the registry's revocation feed. If either process dies, the other is stopped too and
the command exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from rich.console import Console

from broker.cluster.natsd import INSTALL_HINT, LocalNats, find_nats_server
from broker.settings import BrokerSettings
from certfleet.credentials import ensure_service_certs
from certfleet.procs import ManagedProcess, OrchestrationError, ProcessGroup
from certfleet.settings import OrchestrateSettings
from factory.ca import CertificateAuthority
from fleetcore.address import Address, parse_address
from fleetcore.layout import DataLayout

__all__ = ["UpResult", "run_up"]

log = logging.getLogger(__name__)

_METRICS_ENV = "CERTFLEET_BROKER_METRICS_ADDR"
_DEFAULT_METRICS_ADDR = str(BrokerSettings.model_fields["broker_metrics_addr"].default)


@dataclass
class UpResult:
    registry_url: str
    broker_addr: str
    exit_code: int
    broker_pids: list[int] = field(default_factory=list)


def _cluster_env(settings: OrchestrateSettings, stack: contextlib.ExitStack) -> dict[str, str]:
    """Environment joining every broker node to one cluster: the given NATS URL, or a local
    nats-server (JetStream and credentials in <data>/nats, stopped by PID on exit)."""
    if settings.up_brokers == 1 and not settings.broker_cluster_url:
        return {}
    env = {"CERTFLEET_BROKER_REUSE_PORT": "true"}
    if settings.broker_cluster_url:
        env["CERTFLEET_BROKER_CLUSTER_URL"] = settings.broker_cluster_url
        return env
    if find_nats_server() is None:
        raise OrchestrationError(
            f"--brokers {settings.up_brokers} without --cluster runs a local nats-server, "
            f"which is not installed ({INSTALL_HINT}); or pass --cluster nats://HOST:PORT"
        )
    nats = stack.enter_context(LocalNats(settings.data_dir.resolve() / "nats"))
    env.update(
        CERTFLEET_BROKER_CLUSTER_URL=nats.url,
        CERTFLEET_BROKER_CLUSTER_USER=nats.credentials.user,
        CERTFLEET_BROKER_CLUSTER_PASSWORD=nats.credentials.password,
    )
    return env


def _metrics_env(settings: OrchestrateSettings, index: int) -> dict[str, str]:
    """Node ``index`` (0-based) of several gets its own metrics port: the configured one
    plus ``index`` (an ephemeral port stays ephemeral)."""
    if settings.up_brokers == 1:
        return {}
    configured = parse_address(os.environ.get(_METRICS_ENV, _DEFAULT_METRICS_ADDR))
    port = configured.port + index if configured.port else 0
    return {_METRICS_ENV: str(Address(configured.host, port))}


def _print_banner(
    console: Console,
    url: str,
    registry: ManagedProcess,
    brokers: list[ManagedProcess],
    broker_addr: str,
    layout: DataLayout,
) -> None:
    root = layout.root
    console.print(f"registry  {url}  (pid {registry.pid}, log {registry.log_path})")
    console.print(
        f"console   {url}/ui/  (sign in with a token: certfleet registry token create "
        "--operator NAME)"
    )
    for broker in brokers:
        console.print(
            f"broker    mqtts://{broker_addr}  (pid {broker.pid}, log {broker.log_path}"
            + (f", metrics {broker.ready['metrics_url']}" if "metrics_url" in broker.ready else "")
            + ")"
        )
    console.print(f"data      {root}")
    console.print(f"  CA root (clients trust it)    {layout.root_cert}")
    console.print(f"  CA chain (servers trust it)   {layout.chain}")
    console.print(f"  server certificates           {layout.tls_dir}")
    console.print(f"  service/operator certificates {layout.clients_dir}")
    console.print(f"  device bundles                {layout.devices_dir}")
    console.print("press Ctrl-C to stop everything")


def _node_names(settings: OrchestrateSettings) -> list[str]:
    if settings.up_brokers == 1:
        return [settings.broker_node]
    return [f"{settings.broker_node}-{index}" for index in range(1, settings.up_brokers + 1)]


def run_up(
    settings: OrchestrateSettings,
    console: Console,
    *,
    until: float | None = None,
) -> UpResult:
    """Start both services and supervise them until Ctrl-C (or ``until`` seconds, for tests)."""
    layout = DataLayout(settings.data_dir.resolve())
    ca = CertificateAuthority.load(layout, passphrase=settings.passphrase)
    ensure_service_certs(ca, layout)
    root = layout.root
    if parse_address(settings.broker_addr).port == 0:
        raise OrchestrationError(
            "certfleet up needs a fixed broker port (the registry subscribes to it before the "
            "broker starts): set CERTFLEET_BROKER_ADDR or --broker-addr to host:port"
        )
    with contextlib.ExitStack() as stack:
        cluster_env = _cluster_env(settings, stack)
        if cluster_env:
            console.print(f"cluster   {cluster_env['CERTFLEET_BROKER_CLUSTER_URL']}")
        group = stack.enter_context(ProcessGroup(root / "logs"))
        return _run_services(settings, console, group, layout, cluster_env, until)
    raise AssertionError("unreachable")  # pragma: no cover


def _run_services(
    settings: OrchestrateSettings,
    console: Console,
    group: ProcessGroup,
    layout: DataLayout,
    cluster_env: dict[str, str],
    until: float | None,
) -> UpResult:
    root = layout.root
    registry = group.start_registry(
        root, settings.registry_addr, telemetry_broker=settings.broker_addr
    )
    url = str(registry.ready["url"])
    brokers: list[ManagedProcess] = [
        group.start_broker(
            root,
            settings.broker_addr,
            registry_url=url,
            node=node,
            env={**cluster_env, **_metrics_env(settings, index)},
            name="broker" if settings.up_brokers == 1 else f"broker-{node}",
        )
        for index, node in enumerate(_node_names(settings))
    ]
    broker_addr = str(brokers[0].ready.get("addr", settings.broker_addr))
    exit_code = 0
    try:  # from here on, Ctrl-C stops everything cleanly (also while the banner prints)
        _print_banner(console, url, registry, brokers, broker_addr, layout)
        while until is None or time.monotonic() < until:
            for process in (registry, *brokers):
                if not process.alive():
                    console.print(
                        f"[red]{process.name} exited with code {process.popen.returncode}"
                        f"[/red]; its log ends with:\n{process.log_tail()}"
                    )
                    return UpResult(url, broker_addr, 1, [b.pid for b in brokers])
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping broker and registry")
    return UpResult(url, broker_addr, exit_code, [b.pid for b in brokers])
