"""Issuing CA rollover, end to end (issue 26): a fleet of simulated devices (real paho
clients through our broker, the registry answering renewals over MQTT) moves from the old
issuing CA to the new one at its next renewal, with no refused connection and none expired;
the broker picks up the new issuing CA from trust.pem while it runs."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from broker.server import BrokerServer
from device_sim.autorenew import RenewalPolicy
from device_sim.bundle import DeviceBundle
from device_sim.device import DeviceConfig
from device_sim.renewal_events import RenewalOutcome
from device_sim.runner import SimRun
from factory.ca import CertificateAuthority, write_issued
from factory.issuers import authority_key_id, issuer_key_id
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout, write_public
from fleetcore.profile import CLOCK_SKEW, IdentityKind, OperatorRole, serial_hex
from registry.server import RegistryServer
from tests.support.pki import TestPKI, new_pki
from tests.support.servers import certfleet_broker_settings, mqtt_registry_settings
from tests.support.waits import wait_for

# `alone`: certificates living seconds (time bounds).
pytestmark = pytest.mark.alone

DEVICES = 200
# Renewals spread over +-4 s around 12 s of a 40 s lifetime: the registry answers the 200
# with time to spare before anything expires (an 18 s lifetime left a slower machine too
# little: 130 of 200 moved within 14 s in round 10; with 30 s they took about 10 s).
LIFETIME_S = 40
POLICY = RenewalPolicy(at=0.3, jitter=0.1, timeout=8.0, backoff_base=0.3, backoff_cap=1.0)


def _provision(ca: CertificateAuthority, fleet: Path, device_id: str, lifetime_s: float) -> Path:
    now = utcnow()
    issued = ca.issue_client(
        ca.identity(IdentityKind.DEVICE, device_id),
        not_before=now - CLOCK_SKEW,
        not_after=now + dt.timedelta(seconds=lifetime_s),
    )
    directory = DataLayout(fleet).device_dir(device_id)
    write_issued(issued, directory / "device.crt", directory / "device.key")
    write_public(directory / "chain.pem", ca.chain_pem)
    write_public(directory / "root.crt", ca.root_pem)
    meta = {"device_id": device_id, "serial": serial_hex(issued.certificate.serial_number)}
    write_public(directory / "device.json", json.dumps(meta).encode())
    return directory


def _operator(
    pki: TestPKI, registry: RegistryServer, role: OperatorRole | None = None
) -> httpx.Client:
    name = f"alice-{role.value}" if role is not None else "alice"
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.OPERATOR, name), role=role)
    cert, key = pki.layout.client_cert(name), pki.layout.client_key(name)
    write_issued(issued, cert, key)
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(cert), str(key))
    return httpx.Client(base_url=f"{registry.url}/api/v1", verify=context, timeout=30)


@dataclass
class Fleet:
    pki: TestPKI
    broker: BrokerServer
    registry: RegistryServer
    operator: httpx.Client
    registry_layout: DataLayout
    broker_layout: DataLayout
    directories: list[Path]

    def rollover(self) -> str:
        """``certfleet ca rollover`` on the registry's CA folder, trust.pem handed to the
        running broker; the new issuing CA's key id."""
        new = CertificateAuthority.load(self.registry_layout).rollover()
        shutil.copy(self.registry_layout.trust, self.broker_layout.trust)
        app = self.broker.app
        assert wait_for(lambda: app is not None and app.trust_reloader.up_to_date(), 5)
        return new.key_id

    def run(self, duration: float) -> SimRun:
        config = DeviceConfig(
            "127.0.0.1",
            self.broker.port,
            # Readings are not what this tests: few of them, so that 200 devices, the broker
            # and the registry (one process) leave the CPU to handshakes and renewals.
            rate=0.2,
            backoff_base=0.05,
            backoff_cap=0.3,
            renewal=POLICY,
        )
        bundles = [DeviceBundle.load(directory) for directory in self.directories]
        return SimRun(bundles, config, duration=duration, workers=0, seed=5)

    def on_issuer(self, key_id: str) -> bool:
        for directory in self.directories:
            leaf = x509.load_pem_x509_certificate((directory / "device.crt").read_bytes())
            chain = x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes())
            if authority_key_id(leaf) != key_id or issuer_key_id(chain[0]) != key_id:
                return False
        return True


@contextmanager
def fleet_stack(tmp_path: Path, *, devices: int, lifetime_s: float) -> Iterator[Fleet]:
    pki = new_pki(tmp_path / "ca")
    broker_settings = certfleet_broker_settings(pki, tmp_path / "broker-data")
    with BrokerServer(broker_settings) as broker:
        layout = pki.registry_data_dir(tmp_path / "registry-data")
        settings = mqtt_registry_settings(
            layout.root, broker.port, registry_renewal_min_interval_s=1.0
        )
        with RegistryServer(settings) as registry, _operator(pki, registry) as operator:
            assert registry.app.state.telemetry_ingest.subscribed.wait(15)
            directories = [
                _provision(pki.ca, tmp_path / "fleet", f"roll-{i:03d}", lifetime_s)
                for i in range(devices)
            ]
            response = operator.post(
                "/devices/batch",
                json={
                    "devices": [
                        {"certificate_pem": (d / "device.crt").read_text()} for d in directories
                    ]
                },
            )
            assert response.status_code in (200, 201), response.text
            yield Fleet(
                pki,
                broker,
                registry,
                operator,
                layout,
                DataLayout(broker_settings.data_dir),
                directories,
            )


def _assert_clean_move(fleet: Fleet, run: SimRun, devices: int) -> None:
    stats = run.snapshot()
    events = run.renewal_events()
    # Every device renewed (a short-lived one may renew twice), nothing else happened.
    assert {event.device_id for event in events} == {d.name for d in fleet.directories}
    assert {event.outcome for event in events} == {RenewalOutcome.RENEWED}, events
    assert stats.renewals >= devices and len(events) >= devices
    assert stats.expired_before_renewal == 0
    assert stats.failures.total() == 0, stats.failures  # 0 refused connections
    assert stats.renewal_switch_failed == 0
    assert stats.renewal_refused.total() == 0, stats.renewal_refused
    assert stats.stopped == 0, stats.permanent
    refused = fleet.broker.metrics.registry.get_sample_value
    for reason in ("unknown_ca", "expired", "tls_error", "revoked"):
        assert (refused("certfleet_broker_refusals_total", {"reason": reason}) or 0) == 0


def test_a_fleet_moves_to_the_new_issuing_ca_at_renewal(tmp_path: Path) -> None:
    with fleet_stack(tmp_path, devices=DEVICES, lifetime_s=LIFETIME_S) as fleet:
        old_id = issuer_key_id(fleet.pki.ca.issuing_cert)
        new_id = fleet.rollover()
        assert new_id != old_id
        # Up to 32 s (nothing expires before 40 s); stopped once every device has renewed.
        with fleet.run(duration=32) as run:
            want = {d.name for d in fleet.directories}
            while not run.wait(0.2):
                if {event.device_id for event in run.renewal_events()} == want:
                    run.stop()
            assert run.wait(60)
        _assert_clean_move(fleet, run, DEVICES)
        assert fleet.on_issuer(new_id)
        # Who is on which issuing CA: every device on the new one (the expiry report).
        report = fleet.operator.get("/expiry").json()
        assert report["by_issuer"] == {new_id: DEVICES}
        issuers = {row["key_id"]: row for row in fleet.operator.get("/issuers").json()}
        assert issuers[new_id]["current"] and issuers[new_id]["devices"] == DEVICES
        assert not issuers[old_id]["current"] and issuers[old_id]["devices"] == 0


def test_renew_now_moves_devices_at_once_and_needs_the_operator_role(tmp_path: Path) -> None:
    with fleet_stack(tmp_path, devices=10, lifetime_s=3600) as fleet:
        old_id = issuer_key_id(fleet.pki.ca.issuing_cert)
        new_id = fleet.rollover()
        report = fleet.operator.get("/expiry").json()
        assert report["by_issuer"] == {old_id: 10}
        with _operator(fleet.pki, fleet.registry, OperatorRole.VIEWER) as viewer:
            refused = viewer.post("/devices/renew-now", json={"issuer": old_id})
            assert refused.status_code == 403, refused.text
            assert "needs the operator role" in refused.text, refused.text
        with fleet.run(duration=6.0) as run:
            # Once connected (subscribed to their issued topic), the operator asks.
            deadline = utcnow() + dt.timedelta(seconds=10)
            while run.snapshot().connected < 10 and utcnow() < deadline:
                run.wait(0.05)
            asked = fleet.operator.post("/devices/renew-now", json={"issuer": old_id[:12]})
            assert asked.status_code == 200, asked.text
            assert asked.json()["requested"] == 10
            assert run.wait(40)
        _assert_clean_move(fleet, run, 10)
        assert fleet.on_issuer(new_id)
        assert fleet.operator.get("/expiry").json()["by_issuer"] == {new_id: 10}
