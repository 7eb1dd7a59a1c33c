"""`certfleet up`: the registry and the broker together, for real use, until Ctrl-C.

Missing server and service certificates are created from the data folder's CA (which must
exist: ``certfleet ca init``); the registry ingests telemetry from the broker, and the broker
follows the registry's revocation feed. If either process dies, the other is stopped too and
the command exits non-zero.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from rich.console import Console

from certfleet.credentials import ensure_service_certs
from certfleet.procs import OrchestrationError, ProcessGroup
from certfleet.settings import OrchestrateSettings
from factory.ca import CertificateAuthority
from fleetcore.address import parse_address
from fleetcore.layout import DataLayout

__all__ = ["UpResult", "run_up"]

log = logging.getLogger(__name__)


@dataclass
class UpResult:
    registry_url: str
    broker_addr: str
    exit_code: int


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
    with ProcessGroup(root / "logs") as group:
        registry = group.start_registry(
            root, settings.registry_addr, telemetry_broker=settings.broker_addr
        )
        url = str(registry.ready["url"])
        broker = group.start_broker(
            root, settings.broker_addr, registry_url=url, node=settings.broker_node
        )
        broker_addr = str(broker.ready.get("addr", settings.broker_addr))
        console.print(f"registry  {url}  (pid {registry.pid}, log {registry.log_path})")
        console.print(
            f"console   {url}/ui/  (sign in with a token: certfleet registry token create "
            "--operator NAME)"
        )
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
        console.print("press Ctrl-C to stop both")
        exit_code = 0
        try:
            while until is None or time.monotonic() < until:
                for process in (registry, broker):
                    if not process.alive():
                        console.print(
                            f"[red]{process.name} exited with code {process.popen.returncode}"
                            f"[/red]; its log ends with:\n{process.log_tail()}"
                        )
                        return UpResult(url, broker_addr, 1)
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("stopping broker and registry")
        return UpResult(url, broker_addr, exit_code)
