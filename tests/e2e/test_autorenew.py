"""Automatic renewal, end to end (issue 14, device side): our broker, the registry answering
CSRs over MQTT, and simulated devices whose certificates live for seconds. A device renews
by itself and keeps publishing through it; a rate-limited renewal backs off and succeeds; an
expired device says so."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from broker.server import BrokerServer
from device_sim.autorenew import RenewalPolicy
from device_sim.bundle import DeviceBundle
from device_sim.device import DeviceConfig, DeviceState, SimDevice
from device_sim.renew import CertificateExpiredError, renew_bundle
from device_sim.renewal_events import RenewalEvent, RenewalOutcome, read_renewal_events
from device_sim.runner import SimRun
from device_sim.stats import WorkerStats
from factory.ca import write_issued
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout, write_public
from fleetcore.profile import CLOCK_SKEW, IdentityKind, serial_hex
from registry.server import RegistryServer
from tests.support.pki import TestPKI
from tests.support.servers import (
    certfleet_broker_settings,
    mqtt_registry_settings,
    operator_client,
)

# `alone`: certificates living seconds, a 4 s rate limit (time bounds).
pytestmark = pytest.mark.alone

RATE_LIMIT_S = 4.0
POLICY = RenewalPolicy(at=0.3, jitter=0.01, timeout=5.0, backoff_base=0.3, backoff_cap=1.0)


@dataclass
class Stack:
    pki: TestPKI
    fleet_dir: Path
    broker: BrokerServer
    operator: httpx.Client

    def provision(self, device_id: str, lifetime_s: float, *, register: bool = True) -> Path:
        """A bundle whose certificate lives ``lifetime_s`` seconds from now."""
        ca = self.pki.ca
        now = utcnow()
        issued = ca.issue_client(
            ca.identity(IdentityKind.DEVICE, device_id),
            not_before=now - CLOCK_SKEW,
            not_after=now + dt.timedelta(seconds=lifetime_s),
        )
        directory = DataLayout(self.fleet_dir).device_dir(device_id)
        write_issued(issued, directory / "device.crt", directory / "device.key")
        write_public(directory / "chain.pem", ca.chain_pem)
        write_public(directory / "root.crt", ca.root_pem)
        meta = {"device_id": device_id, "serial": serial_hex(issued.certificate.serial_number)}
        write_public(directory / "device.json", json.dumps(meta).encode())
        if register:
            response = self.operator.post(
                "/devices", json={"certificate_pem": (directory / "device.crt").read_text()}
            )
            assert response.status_code == 201, response.text
        return directory


@pytest.fixture(scope="module")
def stack(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("autorenew")
    with BrokerServer(certfleet_broker_settings(pki, root / "broker-data")) as broker:
        layout = pki.registry_data_dir(root / "registry-data")
        settings = mqtt_registry_settings(
            layout.root, broker.port, registry_renewal_min_interval_s=RATE_LIMIT_S
        )
        with RegistryServer(settings) as registry, operator_client(pki, registry.url) as operator:
            assert registry.app.state.telemetry_ingest.subscribed.wait(15)
            yield Stack(pki, root / "fleet", broker, operator)


def _run(
    directory: Path, port: int, duration: float
) -> tuple[SimDevice, WorkerStats, list[RenewalEvent]]:
    config = DeviceConfig(
        "127.0.0.1", port, rate=10.0, backoff_base=0.05, backoff_cap=0.3, renewal=POLICY
    )
    stats = WorkerStats(devices=1)
    events: list[RenewalEvent] = []

    async def scenario() -> SimDevice:
        device = SimDevice(
            DeviceBundle.load(directory),
            config,
            stats,
            connect_slots=asyncio.Semaphore(2),
            renewals=events.append,
            rng=random.Random(3),
        )
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(device.run(stop_at=loop.time() + duration), duration + 20)
        return device

    return asyncio.run(scenario()), stats, events


def _disk_serial(directory: Path) -> str:
    certificate = x509.load_pem_x509_certificate((directory / "device.crt").read_bytes())
    return serial_hex(certificate.serial_number)


def test_a_device_renews_by_itself_and_keeps_publishing(stack: Stack) -> None:
    directory = stack.provision("dev-auto-1", lifetime_s=16)  # renews at about 4.8 s
    old_serial = _disk_serial(directory)
    device, stats, events = _run(directory, stack.broker.port, duration=7.5)
    assert device.state is DeviceState.FINISHED
    assert [event.outcome for event in events] == [RenewalOutcome.RENEWED]
    event = events[0]
    assert event.previous_serial == old_serial != event.serial
    assert event.attempts == 1 and event.retried == 0 and event.refused == ()
    assert event.latency_ms is not None and event.latency_ms > 0
    assert _disk_serial(directory) == event.serial  # promoted on disk
    assert (directory / "previous" / "device.crt").is_file()  # the old pair kept
    assert stats.renewals == 1 and stats.renewal_switch_failed == 0
    # One reconnect (with the new certificate), no drop, nothing lost.
    assert stats.reconnects == 1 and stats.disconnects == {}
    assert stats.acked == stats.produced >= 60
    assert stats.confirms.total() == 1


def test_a_rate_limited_renewal_backs_off_then_succeeds(stack: Stack) -> None:
    directory = stack.provision("dev-auto-2", lifetime_s=10)
    # A renewal just now: the next one within RATE_LIMIT_S is refused with rate_limited.
    renew_bundle(directory, "127.0.0.1", stack.broker.port, timeout=20)
    # Due at about 3 s, refused until 4 s, renewed soon after.
    device, stats, events = _run(directory, stack.broker.port, duration=6.0)
    assert [event.outcome for event in events] == [RenewalOutcome.RENEWED]
    event = events[0]
    assert "rate_limited" in event.refused
    assert event.retried >= 1 and event.attempts == event.retried + 1
    assert stats.renewal_refused["rate_limited"] >= 1
    assert _disk_serial(directory) == event.serial
    assert stats.acked == stats.produced


def test_an_expired_device_is_reported_and_cannot_renew(stack: Stack) -> None:
    directory = stack.provision("dev-auto-3", lifetime_s=1)
    deadline = utcnow() + dt.timedelta(seconds=1.5)
    while utcnow() < deadline:
        asyncio.run(asyncio.sleep(0.1))
    device, stats, events = _run(directory, stack.broker.port, duration=3.0)
    assert [event.outcome for event in events] == [RenewalOutcome.EXPIRED_BEFORE_RENEWAL]
    assert stats.expired_before_renewal == 1
    assert device.state is DeviceState.STOPPED
    assert device.stop_reason in {"certificate_expired", "certificate_rejected"}


def test_sim_renew_says_an_expired_device_needs_re_provisioning(stack: Stack) -> None:
    directory = stack.provision("dev-auto-4", lifetime_s=-1)
    before = (directory / "device.crt").read_bytes()
    with pytest.raises(CertificateExpiredError, match="Re-provision it at the line"):
        renew_bundle(directory, "127.0.0.1", stack.broker.port, timeout=5)
    assert (directory / "device.crt").read_bytes() == before


def test_a_run_writes_its_renewal_events_as_json_lines(stack: Stack, tmp_path: Path) -> None:
    directories = [stack.provision(f"dev-auto-5{i}", lifetime_s=12) for i in range(2)]
    log = tmp_path / "renewals.jsonl"
    config = DeviceConfig("127.0.0.1", stack.broker.port, rate=5.0, renewal=POLICY)
    bundles = [DeviceBundle.load(directory) for directory in directories]
    seen: list[RenewalEvent] = []
    with SimRun(
        bundles, config, duration=6.0, workers=0, seed=2, on_renewal=seen.append, renewal_log=log
    ) as run:
        assert run.wait(40)
    events = read_renewal_events(log)
    assert sorted(event.device_id for event in events) == ["dev-auto-50", "dev-auto-51"]
    assert events == run.renewal_events() == seen
    assert {event.outcome for event in events} == {RenewalOutcome.RENEWED}
    summary = run.summary()
    assert summary["renewals"]["renewed"] == 2
    assert summary["renewals"]["latency"]["count"] == 2
    assert summary["messages_acknowledged"] == summary["messages_produced"]
