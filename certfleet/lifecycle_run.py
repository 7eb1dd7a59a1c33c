"""`certfleet sim lifecycle`: a whole compressed fleet life, once per stagger value.

Each run has its own temporary data folder (removed afterwards) holding a new CA, its own
registry and broker (``certfleet registry serve`` / ``certfleet broker serve`` on loopback,
ephemeral ports, stopped by PID whatever happens), a fleet minted by ``certfleet factory
provision`` with certificate lifetimes of minutes and the run's expiry stagger, and the
simulator with automatic renewal. OpenSSL's real clock does the expiring.

What is measured comes from two sides: each renewal as the device saw it (the simulator's
renewal events: when, how long, refusals and retries) and the certificates the registry
recorded (superseded ones revoked; whether any device was left without an unexpired
certificate).
"""

from __future__ import annotations

import datetime as dt
import logging
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import Session

from certfleet.credentials import ensure_service_certs
from certfleet.lifecycle_stats import (
    IssuedCertificate,
    Renewal,
    RunFigures,
    devices_expired_before_renewal,
    figures,
)
from certfleet.procs import (
    ISOLATED_ENV,
    OrchestrationError,
    ProcessGroup,
    free_port,
    provision_fleet,
)
from device_sim.autorenew import RenewalPolicy
from device_sim.bundle import discover_bundles
from device_sim.device import DeviceConfig
from device_sim.renewal_events import RenewalEvent, RenewalOutcome
from device_sim.runner import SimRun
from factory.ca import CertificateAuthority
from fleetcore.layout import DataLayout
from fleetcore.profile import CLOCK_SKEW
from registry.db import make_engine
from registry.settings import RegistrySettings
from registry.store.certificates import all_certificates

__all__ = [
    "LifecyclePlan",
    "Progress",
    "StaggerRun",
    "registry_env",
    "renewal_policy",
    "run_lifecycle",
]

log = logging.getLogger(__name__)

TRUST_DOMAIN = "fleet.lifecycle"
#: The superseded grace is at most this share of the lifetime by default (issue 14).
DEFAULT_GRACE_FRACTION = 0.05


@dataclass(frozen=True)
class LifecyclePlan:
    """What `certfleet sim lifecycle` runs (seconds throughout)."""

    devices: int
    lifetime_s: int
    staggers_s: tuple[int, ...]
    duration_s: float
    #: Grace before a superseded certificate is revoked; default 5 % of the lifetime.
    grace_s: float | None = None
    #: Telemetry readings per second per device (low: the renewals are what is measured).
    rate: float = 0.1
    workers: int | None = None
    #: Where the runs' temporary data folders go (default: the system's temp folder).
    work_dir: Path | None = None
    #: Keep each run's data folder (logs, registry.db, bundles) instead of removing it.
    keep: bool = False

    @property
    def grace(self) -> float:
        if self.grace_s is not None:
            return self.grace_s
        return round(self.lifetime_s * DEFAULT_GRACE_FRACTION, 3)


@dataclass
class StaggerRun:
    """The result of one run: its figures and what the registry recorded."""

    stagger_s: int
    figures: RunFigures
    expired_before_renewal: int
    superseded_revoked: int
    renewal_times_s: list[float]
    certificates_issued: int
    facts: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The run's entry in the ``--json`` object (the issue's schema)."""
        result = self.figures
        return {
            "stagger_s": self.stagger_s,
            "renewals": result.renewals,
            "peak_renewals_per_s": result.peak_renewals_per_s,
            "p99_renewals_per_s": result.p99_renewals_per_s,
            "renewal_latency_p50_ms": result.renewal_latency_p50_ms,
            "renewal_latency_p99_ms": result.renewal_latency_p99_ms,
            "refused": result.refused,
            "retried": result.retried,
            "expired_before_renewal": self.expired_before_renewal,
            "superseded_revoked": self.superseded_revoked,
        }


#: Told about each run's progress: (stagger_s, phase, seconds into the fleet's life,
#: renewals so far, devices connected).
Progress = Callable[[int, str, float, int, int], None]


def registry_env(plan: LifecyclePlan) -> dict[str, str]:
    """The registry settings a compressed life needs, as CERTFLEET_* variables.

    No renewal stagger window: a renewed certificate copies the length of the current one,
    which holds the device's offset from minting, so each run's stagger carries into every
    generation (docs/lifecycle.md, "Renewals keep the stagger")."""
    return {
        # A device renews about once per 2/3 of a lifetime: the per-device limit must
        # allow that, and still stop a device that loops.
        "CERTFLEET_REGISTRY_RENEWAL_MIN_INTERVAL_S": str(max(1, plan.lifetime_s // 4)),
        "CERTFLEET_REGISTRY_SUPERSEDE_GRACE_S": f"{plan.grace:g}",
    }


def renewal_policy(lifetime_s: int) -> RenewalPolicy:
    """The devices' renewal policy scaled to a compressed lifetime: answers awaited and
    backoff capped at a tenth of it (the defaults, 30 s and 60 s, suit lifetimes of days)."""
    tenth = max(2.0, min(30.0, lifetime_s / 10))
    return RenewalPolicy(timeout=tenth, backoff_base=min(1.0, tenth / 4), backoff_cap=tenth)


class _RenewalLog:
    """The simulator's renewal events (from its collector thread), as Renewals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_wall = time.time()
        self.renewals: list[Renewal] = []
        self.expired: set[str] = set()

    def record(self, event: RenewalEvent) -> None:
        renewed = event.outcome is RenewalOutcome.RENEWED
        milliseconds = event.total_ms if event.total_ms is not None else event.latency_ms
        renewal = Renewal(
            device_id=event.device_id,
            completed_s=event.wall_time - self.started_wall,
            latency_s=(milliseconds or 0.0) / 1000.0 if renewed else None,
            refused=len(event.refused),
            retried=event.retried,
        )
        with self._lock:
            self.renewals.append(renewal)
            if event.outcome is RenewalOutcome.EXPIRED_BEFORE_RENEWAL:
                self.expired.add(event.device_id)

    @property
    def count(self) -> int:
        with self._lock:
            return sum(1 for renewal in self.renewals if renewal.succeeded)


def _registry_certificates(
    data_dir: Path, started_wall: float
) -> tuple[list[IssuedCertificate], int]:
    """Every certificate the run's registry issued or registered, and how many it revoked as
    superseded."""
    settings = RegistrySettings(data_dir=data_dir, registry_database_url=None)
    engine = make_engine(settings)
    started = dt.datetime.fromtimestamp(started_wall, dt.UTC)
    try:
        with Session(engine) as session:
            rows = all_certificates(session)
    finally:
        engine.dispose()
    issued = [
        IssuedCertificate(
            device_id=row.device_id,
            issued_s=(row.not_before + CLOCK_SKEW - started).total_seconds(),
            not_after_s=(row.not_after - started).total_seconds(),
        )
        for row in rows
    ]
    superseded = sum(1 for row in rows if row.revocation_reason == "superseded")
    return issued, superseded


def _raise_open_file_limit() -> None:
    """The broker holds one socket per device; children inherit the raised soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Run:
    def __init__(self, plan: LifecyclePlan, stagger_s: int, progress: Progress) -> None:
        self.plan = plan
        self.stagger_s = stagger_s
        self.progress = progress

    def execute(self, folder: Path) -> StaggerRun:
        plan = self.plan
        layout = DataLayout(folder)
        ca = CertificateAuthority.init(layout, TRUST_DOMAIN)
        ensure_service_certs(ca, layout)
        broker_addr = f"127.0.0.1:{free_port()}"
        env = {**ISOLATED_ENV, **registry_env(plan)}
        self.progress(self.stagger_s, "starting registry and broker", 0.0, 0, 0)
        with ProcessGroup(folder / "logs") as group:
            registry = group.start_registry(
                folder, "127.0.0.1:0", telemetry_broker=broker_addr, env=env
            )
            url = str(registry.ready["url"])
            broker = group.start_broker(folder, broker_addr, registry_url=url, env=env)
            self.progress(self.stagger_s, f"minting {plan.devices} devices", 0.0, 0, 0)
            provision_fleet(
                folder,
                plan.devices,
                registry_url=url,
                broker_addr=broker_addr,
                lifetime=f"{plan.lifetime_s}s",
                stagger=f"{self.stagger_s}s",
                env=env,
            )
            renewals = _RenewalLog()
            simulator = self._simulate(layout, broker_addr, renewals)
            for process in (registry, broker):
                if not process.alive():
                    raise OrchestrationError(
                        f"{process.name} died during the run; its log ends with:\n"
                        f"{process.log_tail()}"
                    )
            certificates, superseded = _registry_certificates(folder, renewals.started_wall)
        expired = devices_expired_before_renewal(certificates, plan.duration_s) | renewals.expired
        return StaggerRun(
            stagger_s=self.stagger_s,
            figures=figures(renewals.renewals, plan.duration_s),
            expired_before_renewal=len(expired),
            superseded_revoked=superseded,
            renewal_times_s=sorted(r.completed_s for r in renewals.renewals if r.succeeded),
            certificates_issued=len(certificates),
            facts={"data_dir": str(folder), "registry_url": url, "simulator": simulator},
        )

    def _simulate(
        self, layout: DataLayout, broker_addr: str, renewals: _RenewalLog
    ) -> dict[str, Any]:
        plan = self.plan
        host, _, port = broker_addr.rpartition(":")
        config = DeviceConfig(
            host, int(port), rate=plan.rate, qos=1, renewal=renewal_policy(plan.lifetime_s)
        )
        run = SimRun(
            discover_bundles(layout.root),
            config,
            duration=plan.duration_s,
            workers=plan.workers,
            on_renewal=renewals.record,
            renewal_log=layout.root / "renewals.jsonl",  # kept with --keep, for a second look
        )
        renewals.started_wall = time.time()
        with run:
            while not run.wait(0.5):
                self.progress(
                    self.stagger_s, "running", run.elapsed, renewals.count, run.snapshot().connected
                )
        if run.errors:
            raise OrchestrationError(f"the simulator failed: {'; '.join(run.errors)}")
        summary = run.summary()
        if summary["devices_connected_ever"] < plan.devices:
            log.warning(
                "not every device connected connected=%d devices=%d stopped=%s",
                summary["devices_connected_ever"],
                plan.devices,
                summary["stopped_by_reason"],
            )
        self.progress(self.stagger_s, "done", plan.duration_s, renewals.count, 0)
        return summary


def run_lifecycle(plan: LifecyclePlan, progress: Progress | None = None) -> list[StaggerRun]:
    """Run the plan once per stagger value, one after the other (never two at once: each
    would slow the other's registry)."""
    _raise_open_file_limit()
    report = progress or (lambda *_: None)
    results: list[StaggerRun] = []
    for stagger_s in plan.staggers_s:
        folder = Path(
            tempfile.mkdtemp(prefix=f"certfleet-lifecycle-{stagger_s}s-", dir=plan.work_dir)
        )
        try:
            results.append(_Run(plan, stagger_s, report).execute(folder))
        finally:
            if plan.keep:
                log.info("lifecycle data folder kept path=%s", folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)
    return results
