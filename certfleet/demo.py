"""`certfleet demo`: the whole system, proven end to end on one machine.

1. a fresh demo folder (wiped only if a previous demo made it) and a new CA;
2. server certificates for the broker and the registry, service certificates (broker,
   registry, factory) and an operator certificate;
3. the registry started as a subprocess (``certfleet registry serve``), then the devices
   provisioned and registered with it (``certfleet factory provision --registry``);
4. the broker started as a subprocess (``certfleet broker serve``) following the registry's
   revocation feed;
5. a production batch's claim minted (``certfleet factory claim create``) and a few devices
   that hold only that claim and their hardware serial enrolling over EST (their keys born
   on them), plus one serial outside the batch's allow-list refused;
6. the simulator publishing from every device, factory-minted and enrolled alike;
7. one device decommissioned over REST with the operator's certificate, and the proof:
   its live connection dropped within a second of the call returning, its reconnect refused,
   every other device still publishing, and the registry's last-seen view.

Every check is printed; the command exits non-zero when any fails. The subprocesses are
stopped by PID whatever happens (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from certfleet.credentials import ensure_client_cert, ensure_service_certs
from certfleet.procs import (
    ISOLATED_ENV,
    OrchestrationError,
    ProcessGroup,
    create_claim,
    free_port,
    provision_fleet,
)
from certfleet.settings import OrchestrateSettings
from device_sim.bundle import discover_bundles
from device_sim.device import DeviceConfig, DeviceEvent
from device_sim.est_enroll import ClaimCredentials, enroll_fleet
from device_sim.runner import SimRun
from factory.ca import CertificateAuthority
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from fleetcore.tls import service_client_context

__all__ = ["DEMO_MARKER", "ZERO_TOUCH", "Check", "DemoResult", "prepare_demo_folder", "run_demo"]

log = logging.getLogger(__name__)

DEMO_MARKER = ".certfleet-demo"
OPERATOR = "demo-operator"
#: Devices the demo enrolls by claim over EST (zero-touch), beside the factory-minted ones.
ZERO_TOUCH = 3
CLAIM_BATCH = "demo-batch"
#: Reasons a device stops for when its identity is refused (TLS alert or CONNACK).
REFUSAL_REASONS = {
    "certificate_revoked",
    "certificate_rejected",
    "certificate_unknown_ca",
    "connack_not_authorized",
    "connack_bad_credentials",
    "connack_identifier_rejected",
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DemoResult:
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)


class EventLog:
    """Device events from the simulator's workers, indexed for the demo's questions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.by_device: dict[str, list[DeviceEvent]] = {}

    def record(self, event: DeviceEvent) -> None:
        with self._changed:
            self.by_device.setdefault(event.device_id, []).append(event)
            self._changed.notify_all()

    def wait_for(
        self, device_id: str, predicate: Callable[[DeviceEvent], bool], timeout: float
    ) -> DeviceEvent | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.by_device.get(device_id, []):
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)


def prepare_demo_folder(folder: Path) -> DataLayout:
    """An empty demo folder: a previous demo's folder is wiped; anything else is refused."""
    if folder.exists():
        if (folder / DEMO_MARKER).exists():
            shutil.rmtree(folder)
        elif any(folder.iterdir()):
            raise OrchestrationError(
                f"{folder} exists and was not made by 'certfleet demo'; refusing to wipe it: "
                "pass --demo-dir with a new or previous demo folder"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("made by certfleet demo; wiped by the next demo run\n")
    return DataLayout(folder)


def operator_client(layout: DataLayout, base_url: str, name: str = OPERATOR) -> httpx.Client:
    """An HTTPS client for the registry that authenticates with the operator's certificate."""
    context = service_client_context(layout, name)
    return httpx.Client(base_url=base_url, verify=context, timeout=30.0)


class _Demo:
    def __init__(self, settings: OrchestrateSettings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.result = DemoResult()
        self.events = EventLog()
        self._started = time.monotonic()

    # -- output ---------------------------------------------------------------------------

    def step(self, message: str) -> None:
        elapsed = time.monotonic() - self._started
        self.console.print(f"[dim]{elapsed:6.1f}s[/dim]  {message}")

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.result.checks.append(Check(name, ok, detail))
        mark = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
        self.step(f"{mark} {name}: {detail}")
        return ok

    # -- the run --------------------------------------------------------------------------

    def run(self) -> DemoResult:
        settings = self.settings
        count = settings.demo_devices
        layout = prepare_demo_folder(settings.demo_folder.resolve())
        root = layout.root
        self.result.facts["demo_dir"] = str(root)
        self.step(f"demo folder {root}")

        ca = CertificateAuthority.init(layout, settings.trust_domain)
        ensure_service_certs(ca, layout)
        ensure_client_cert(ca, layout, IdentityKind.OPERATOR, OPERATOR)
        self.step(
            f"CA for trust domain {ca.trust_domain}; server certificates for broker and "
            f"registry; service certificates; operator certificate clients/{OPERATOR}.crt"
        )

        broker_port = free_port()
        broker_addr = f"127.0.0.1:{broker_port}"
        with ProcessGroup(root / "logs") as group:
            registry = group.start_registry(
                root, "127.0.0.1:0", telemetry_broker=broker_addr, env=ISOLATED_ENV
            )
            url = str(registry.ready["url"])
            self.result.facts["registry_url"] = url
            self.result.facts["registry_pid"] = registry.pid
            self.step(f"registry listening at {url} (pid {registry.pid})")

            self._provision(root, url, broker_addr, count)

            broker = group.start_broker(root, broker_addr, registry_url=url, env=ISOLATED_ENV)
            self.result.facts["broker_addr"] = broker.ready.get("addr", broker_addr)
            self.result.facts["broker_pid"] = broker.pid
            self.step(f"broker listening at {broker.ready.get('addr')} (pid {broker.pid})")

            with operator_client(layout, url) as http:
                self._check_registered(http, count)
                enrolled = self._enroll_by_claim(root, url, broker_addr)
                self._simulate(layout, http, broker_port, count + len(enrolled), enrolled)
        return self.result

    def _enroll_by_claim(self, root: Path, url: str, broker_addr: str) -> list[str]:
        """Zero-touch: mint a batch's claim, enroll ZERO_TOUCH devices with it over EST
        (each knowing only its hardware serial), and see a stranger's serial refused."""
        serials = [f"SN-DEMO-{index:04d}" for index in range(1, ZERO_TOUCH + 1)]
        allow = root / "claims" / f"{CLAIM_BATCH}.allow"
        allow.parent.mkdir(parents=True, exist_ok=True)
        allow.write_text("".join(f"zt-{s[-4:]},{s}\n" for s in serials))
        create_claim(
            root, CLAIM_BATCH, quota=ZERO_TOUCH, allow_file=allow, registry_url=url,
            env=ISOLATED_ENV,
        )  # fmt: skip
        refusals: list[str] = []
        report = enroll_fleet(
            ClaimCredentials.load(root / "claims" / CLAIM_BATCH),
            url,
            [*serials, "SN-STRANGER"],
            root,
            broker_addr,
            concurrency=ZERO_TOUCH + 1,
            on_refused=refusals.append,
        )
        enrolled = [bundle.device_id for bundle in report.enrolled]
        self.result.facts["est_enrollment"] = report.as_dict()
        self.check(
            "devices enrolled by claim over EST",
            len(enrolled) == ZERO_TOUCH,
            f"{', '.join(enrolled)} enrolled with claim {CLAIM_BATCH} in "
            f"{report.elapsed_s * 1000:.0f} ms (key made on the device, CSR naming only its "
            "hardware serial)",
        )
        self.check(
            "serial outside the allow-list refused",
            list(report.refused) == ["SN-STRANGER"],
            refusals[0] if refusals else "SN-STRANGER was enrolled",
        )
        return enrolled

    def _provision(self, root: Path, url: str, broker_addr: str, count: int) -> None:
        started = time.monotonic()
        summary = provision_fleet(
            root, count, registry_url=url, broker_addr=broker_addr, env=ISOLATED_ENV
        )
        self.result.facts["provision"] = summary
        self.step(
            f"{count} devices provisioned and registered in {time.monotonic() - started:.1f}s "
            f"(bundles in {root / 'devices'})"
        )

    def _check_registered(self, http: httpx.Client, count: int) -> None:
        response = http.get("/api/v1/stats")
        response.raise_for_status()
        active = int(response.json().get("devices_by_status", {}).get("active", 0))
        self.check("devices registered", active == count, f"{active} active in the registry")

    def _simulate(
        self,
        layout: DataLayout,
        http: httpx.Client,
        broker_port: int,
        count: int,
        enrolled: list[str],
    ) -> None:
        settings = self.settings
        bundles = discover_bundles(layout.root)
        config = DeviceConfig("127.0.0.1", broker_port, rate=settings.demo_rate, qos=1)
        run = SimRun(
            bundles,
            config,
            duration=3600.0,
            workers=settings.demo_workers,
            on_event=self.events.record,
        )
        with run:
            self._wait_connected(run, count)
            time.sleep(settings.demo_warmup_s)  # let the fleet publish for a while
            before = run.snapshot()
            self.step(
                f"fleet publishing: {before.connected} connected, {before.acked:,} messages "
                "acknowledged so far"
            )
            minted = [bundle for bundle in bundles if bundle.device_id not in enrolled]
            victim = minted[len(minted) // 2].device_id  # dev-000501 of 1,000, as before
            witness = minted[0].device_id
            self._decommission_and_prove(run, http, victim, count)
            self._registry_view(http, victim, witness, count)
            self._enrolled_view(http, enrolled)
            run.stop()
            run.wait(30)
            self.result.facts["simulator"] = run.summary()

    def _wait_connected(self, run: SimRun, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        stats = run.snapshot()
        while time.monotonic() < deadline and not run.finished:
            stats = run.snapshot()
            if stats.connected >= count or stats.stopped:
                break
            run.wait(0.25)
        self.check(
            "every device connected",
            stats.connected == count and stats.stopped == 0,
            f"{stats.connected}/{count} connected over mTLS, connect p50 "
            f"{stats.connect_latency.percentile(50) or 0:.0f} ms"
            + (f", {stats.stopped} stopped: {dict(stats.permanent)}" if stats.stopped else ""),
        )

    def _decommission_and_prove(
        self, run: SimRun, http: httpx.Client, victim: str, count: int
    ) -> None:
        settings = self.settings
        self.step(f"decommissioning {victim} over REST as operator/{OPERATOR}")
        called_at = time.time()
        response = http.post(
            f"/api/v1/devices/{victim}/decommission",
            json={"reason": "demo: device reported stolen"},
        )
        returned_at = time.time()
        at_decommission, counted_from = run.snapshot(), time.monotonic()
        body = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        self.check(
            "decommission accepted",
            response.status_code == 200 and body.get("status") == "decommissioned",
            f"HTTP {response.status_code}, status={body.get('status')}, "
            f"revocation_seq={body.get('revocation_seq')}, call took "
            f"{(returned_at - called_at) * 1000:.0f} ms",
        )

        dropped = self.events.wait_for(
            victim, lambda e: e.kind == "disconnected" and e.wall_time >= called_at - 0.01, 10.0
        )
        if dropped is None:
            self.check("live session dropped", False, f"{victim} still connected after 10 s")
        else:
            after_return = dropped.wall_time - returned_at
            self.result.facts["drop_after_return_s"] = round(after_return, 3)
            self.check(
                f"live session dropped within {settings.demo_drop_budget_s:g} s",
                after_return <= settings.demo_drop_budget_s,
                f"dropped {after_return * 1000:+.0f} ms after the call returned "
                f"({(dropped.wall_time - called_at) * 1000:.0f} ms after it was made), "
                f"reason {dropped.reason}",
            )

        stopped = self.events.wait_for(victim, lambda e: e.kind == "stopped", 40.0)
        refused = self.events.wait_for(
            victim, lambda e: e.kind == "connect_failed" and e.wall_time >= called_at, 0.0
        )
        self.check(
            "reconnect refused",
            stopped is not None and refused is not None and stopped.reason in REFUSAL_REASONS,
            f"reconnect refused ({refused.reason if refused else 'no attempt seen'}); "
            f"device gave up: {stopped.reason if stopped else 'no'}",
        )

        time.sleep(settings.demo_observe_s)  # the others keep publishing meanwhile
        after = run.snapshot()
        window = time.monotonic() - counted_from
        sent_after = after.acked - at_decommission.acked
        expected = (count - 1) * settings.demo_rate * window
        self.result.facts["messages_after_decommission"] = sent_after
        self.check(
            "others still publishing",
            after.connected == count - 1 and sent_after >= 0.8 * expected,
            f"{after.connected}/{count - 1} others connected; {sent_after:,} messages "
            f"acknowledged since the decommission (~{expected:,.0f} expected)",
        )

    def _registry_view(self, http: httpx.Client, victim: str, witness: str, count: int) -> None:
        victim_view = http.get(f"/api/v1/devices/{victim}").json()
        revoked = [c for c in victim_view.get("certificates", []) if c.get("status") == "revoked"]
        self.check(
            "registry shows the device decommissioned",
            victim_view.get("status") == "decommissioned" and bool(revoked),
            f"{victim}: status={victim_view.get('status')}, {len(revoked)} certificate(s) revoked",
        )
        witness_view = http.get(f"/api/v1/devices/{witness}").json()
        telemetry = witness_view.get("last_telemetry") or {}
        self.check(
            "registry shows last seen",
            bool(witness_view.get("last_seen_at")) and "seq" in telemetry,
            f"{witness}: last_seen_at={witness_view.get('last_seen_at')}, "
            f"last telemetry seq={telemetry.get('seq')} "
            f"temperature={telemetry.get('temperature_c')} C",
        )
        seen = 0
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            seen = int(http.get("/api/v1/stats").json().get("seen_last_minute", 0))
            if seen >= count - 1:
                break
            time.sleep(0.5)
        self.check(
            "registry stats seen in the last minute",
            seen >= count - 1,
            f"seen_last_minute={seen} (fleet of {count})",
        )

    def _enrolled_view(self, http: httpx.Client, enrolled: list[str]) -> None:
        views = [http.get(f"/api/v1/devices/{device_id}").json() for device_id in enrolled]
        publishing = [
            f"{view.get('device_id')} ({view.get('hardware_serial')}, seq "
            f"{(view.get('last_telemetry') or {}).get('seq')})"
            for view in views
            if view.get("last_seen_at") and view.get("status") == "active"
        ]
        self.check(
            "devices enrolled by claim publishing",
            bool(enrolled) and len(publishing) == len(enrolled),
            f"registry last seen: {', '.join(publishing) or 'none'}",
        )


def render_result(result: DemoResult, console: Console) -> None:
    table = Table(title="certfleet demo: the proof")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in result.checks:
        table.add_row(
            check.name, "[green]PASS[/green]" if check.ok else "[red]FAIL[/red]", check.detail
        )
    console.print(table)
    simulator = result.facts.get("simulator")
    if simulator:
        console.print(
            f"simulator: {simulator['messages_acknowledged']:,} messages acknowledged, "
            f"publish p50 {simulator['publish_latency']['p50_ms']} ms / "
            f"p99 {simulator['publish_latency']['p99_ms']} ms, "
            f"stopped: {simulator['stopped_by_reason']}"
        )
    if "demo_dir" in result.facts:
        console.print(f"logs and data: {result.facts['demo_dir']}")


def run_demo(settings: OrchestrateSettings, console: Console) -> DemoResult:
    """Run the demo; a failed check is recorded, a failed step raises OrchestrationError."""
    demo = _Demo(settings, console)
    try:
        return demo.run()
    except httpx.HTTPError as exc:
        raise OrchestrationError(f"talking to the registry failed: {exc}") from None
