"""The registry and broker side of a certificate's life (issue 14), end to end: our broker
following the registry's feed, the registry answering renewals and confirms over MQTT, real
paho devices, lifetimes and graces of seconds.

- a confirmed renewal revokes the superseded certificate after the grace (feed, CRL, broker)
  while the device's connection with its new certificate stays up;
- an expired certificate leaves the CRL and the broker's revoked set, not before its
  not_after + CLOCK_SKEW;
- the expiry gauges move when a device renews or is decommissioned;
- ``certfleet registry expiry-report`` lists an expired device.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from prometheus_client.parser import text_string_to_metric_families

from broker.auth import Refusal
from broker.revoked_set import RevokedSet
from broker.server import BrokerServer
from device_sim.renew import renew_bundle
from factory.ca import write_issued
from fleetcore.clock import utcnow
from fleetcore.keys import build_csr, generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import CLOCK_SKEW, Identity, IdentityKind, serial_hex
from fleetcore.topics import issued_topic, renew_topic, telemetry_topic
from registry.server import RegistryServer
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import ClientFiles, TestPKI, write_device_bundle
from tests.support.pki import registry_data_dir as renewal_data_dir
from tests.support.ports import free_port
from tests.support.servers import broker_settings, feed_broker_layout, mqtt_registry_settings
from tests.support.waits import wait_for

# `alone`: graces of 3 s and certificates expiring in seconds (time bounds).
pytestmark = pytest.mark.alone

GRACE_S = 3.0


@dataclass
class Lifecycle:
    pki: TestPKI
    root: Path
    broker: BrokerServer
    registry: RegistryServer
    operator: httpx.Client

    def device_dir(self, device_id: str) -> Path:
        return self.root / "fleet" / "devices" / device_id

    def register_pem(self, certificate_pem: str) -> None:
        response = self.operator.post("/devices", json={"certificate_pem": certificate_pem})
        assert response.status_code in (200, 201), response.text

    def provision(self, device_id: str) -> ClientFiles:
        """A device bundle, registered; returns a copy of its first certificate and key."""
        serial = write_device_bundle(self.pki.ca, self.root / "fleet", device_id)
        directory = self.device_dir(device_id)
        self.register_pem((directory / "device.crt").read_text())
        return self.snapshot(device_id, serial)

    def snapshot(self, device_id: str, serial: int) -> ClientFiles:
        """The bundle's current certificate and key copied aside (renewal replaces them)."""
        directory = self.device_dir(device_id)
        keep = self.root / "kept" / f"{device_id}-{serial_hex(serial)}"
        keep.mkdir(parents=True)
        shutil.copy(directory / "device.crt", keep / "device.crt")
        shutil.copy(directory / "device.key", keep / "device.key")
        return ClientFiles(
            keep / "device.crt", keep / "device.key", self.pki.layout.root_cert, serial
        )

    def renew(self, device_id: str) -> ClientFiles:
        renew_bundle(self.device_dir(device_id), "127.0.0.1", self.broker.port, timeout=20)
        cert = x509.load_pem_x509_certificate(
            (self.device_dir(device_id) / "device.crt").read_bytes()
        )
        return self.snapshot(device_id, cert.serial_number)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        text = self.operator.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and (labels is None or sample.labels == labels):
                    return float(sample.value)
        raise AssertionError(f"metric {name}{labels or ''} not on /metrics")

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(self.operator.get("/crl.pem").content)


def _registry_data_dir(pki: TestPKI, root: Path) -> Path:
    """The renewal tests' registry data folder, plus operator alice's client certificate."""
    data_dir = renewal_data_dir(pki, root)
    layout = DataLayout(data_dir)
    operator = pki.ca.issue_client(pki.ca.identity(IdentityKind.OPERATOR, "alice"))
    write_issued(operator, layout.client_cert("alice"), layout.client_key("alice"))
    return data_dir


@pytest.fixture(scope="module")
def stack(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    root = tmp_path_factory.mktemp("lifecycle")
    broker_port = free_port()
    data_dir = _registry_data_dir(pki, root / "registry-data")
    settings = mqtt_registry_settings(
        data_dir,
        broker_port,
        registry_feed_poll_seconds=0.2,
        registry_renewal_min_interval_s=0,
        registry_renewal_lifetime_days=120,
        registry_supersede_grace_s=GRACE_S,
        registry_supersede_check_s=0.5,
        registry_expiry_metrics_cache_s=0,
    )
    with RegistryServer(settings) as registry:
        layout = feed_broker_layout(pki, root / "broker-data")
        broker_config = broker_settings(
            layout,
            broker_addr=f"127.0.0.1:{broker_port}",
            registry_url=registry.url,
            broker_feed_wait_s=5,
            broker_prune_s=0.3,
        )
        with BrokerServer(broker_config) as broker:
            context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
            context.load_cert_chain(
                str(data_dir / "clients" / "alice.crt"), str(data_dir / "clients" / "alice.key")
            )
            with httpx.Client(
                base_url=f"{registry.url}/api/v1", verify=context, timeout=30
            ) as operator:
                ingest = registry.app.state.telemetry_ingest
                assert ingest.subscribed.wait(15), "registry did not subscribe to the broker"
                assert broker.app is not None and broker.app.follower is not None
                assert wait_for(broker.app.follower.synced.is_set, 15), "broker not following"
                yield Lifecycle(pki, root, broker, registry, operator)


def _confirm(device: MqttProbe, device_id: str, serial: str, seen: int) -> dict[str, str]:
    """Publish a confirm on cert/renew; the answer on cert/issued (the ``seen``-th + 1)."""
    device.client.publish(renew_topic(device_id), json.dumps({"confirm": serial}), qos=1)
    answers = lambda: [p for t, p in device.messages if t == issued_topic(device_id)]  # noqa: E731
    assert wait_for(lambda: len(answers()) > seen, 15), "no answer to the confirm"
    answer: dict[str, str] = json.loads(answers()[seen])
    return answer


def _listens(device: MqttProbe, device_id: str) -> None:
    device.client.subscribe(issued_topic(device_id), qos=1)
    assert device.subscribed.wait(10) and device.suback == [1], device.suback


def test_confirmed_renewal_revokes_the_superseded_certificate_after_the_grace(
    stack: Lifecycle,
) -> None:
    device_id = "dev-life-1"
    old = stack.provision(device_id)
    time.sleep(1.1)  # "newest" is the latest not_before, which X.509 keeps to the second
    new = stack.renew(device_id)
    old_serial, new_serial = serial_hex(old.serial), serial_hex(new.serial)

    device = connect(stack.broker.port, new, device_id)
    try:
        assert device.connected.is_set(), device.reason
        _listens(device, device_id)
        assert _confirm(device, device_id, new_serial, 0) == {"confirmed": new_serial}
        confirmed_at = time.monotonic()
        # Idempotent, and only the newest certificate can be confirmed.
        assert _confirm(device, device_id, new_serial, 1) == {"confirmed": new_serial}
        assert _confirm(device, device_id, old_serial, 2)["error"] == "not_newest"
        assert _confirm(device, device_id, "abcdef0123", 3)["error"] == "unknown_serial"

        # Within the grace the old certificate is still live (and not in the broker's set).
        body = stack.operator.get(f"/devices/{device_id}").json()
        statuses = {c["serial"]: c["status"] for c in body["certificates"]}
        assert time.monotonic() - confirmed_at < GRACE_S
        assert statuses == {old_serial: "live", new_serial: "live"}
        assert stack.broker.app is not None
        assert not stack.broker.app.revoked.is_serial_revoked(old_serial)

        revoked = stack.broker.app.revoked
        assert wait_for(lambda: revoked.is_serial_revoked(old_serial), GRACE_S + 15)
        assert time.monotonic() - confirmed_at >= GRACE_S - 0.5
        # The superseded event revoked a serial, not the device: its session stays up.
        assert not revoked.is_device_decommissioned(device_id)
        time.sleep(0.5)
        assert not device.disconnected.is_set(), device.reason
        info = device.client.publish(telemetry_topic(device_id), b'{"t": 1}', qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        device.close()

    refused_before = stack.broker.metrics.refusal_count(Refusal.REVOKED.value)
    again = connect(stack.broker.port, old, device_id)
    try:
        assert not again.connected.is_set()
        assert wait_for(
            lambda: stack.broker.metrics.refusal_count(Refusal.REVOKED.value) == refused_before + 1
        )
    finally:
        again.close()
    still = connect(stack.broker.port, new, device_id)
    try:
        assert still.connected.is_set(), still.reason
    finally:
        still.close()

    body = stack.operator.get(f"/devices/{device_id}").json()
    assert body["status"] == "active"
    by_serial = {c["serial"]: c for c in body["certificates"]}
    assert by_serial[old_serial]["status"] == "revoked"
    assert by_serial[old_serial]["revocation_reason"] == "superseded"
    assert by_serial[new_serial]["status"] == "live"

    entry = stack.crl().get_revoked_certificate_by_serial_number(old.serial)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.superseded
    assert stack.crl().get_revoked_certificate_by_serial_number(new.serial) is None

    feed = stack.operator.get("/revocations", params={"kinds": "decommission,superseded"})
    [event] = [e for e in feed.json()["events"] if e["device_id"] == device_id]
    assert (event["kind"], event["serials"], event["reason_code"]) == (
        "superseded",
        [old_serial],
        "superseded",
    )
    assert dt.datetime.fromisoformat(event["not_after"][old_serial]) == dt.datetime.fromisoformat(
        by_serial[old_serial]["not_after"]
    )
    # A follower that does not ask for kinds (older brokers) never sees it.
    legacy = stack.operator.get("/revocations").json()
    assert all(e["device_id"] != device_id for e in legacy["events"])
    assert legacy["last_seq"] >= event["seq"]
    assert stack.metric("certfleet_registry_superseded_revocations_total") >= 1
    assert stack.metric("certfleet_registry_renewal_confirms_total", {"outcome": "confirmed"}) >= 2


def test_a_session_still_presenting_the_superseded_certificate_is_dropped_after_the_grace(
    stack: Lifecycle,
) -> None:
    device_id = "dev-life-2"
    old = stack.provision(device_id)
    time.sleep(1.1)  # "newest" is the latest not_before, which X.509 keeps to the second
    new = stack.renew(device_id)
    # The device is still connected with its old certificate (its swap is not done) when a
    # confirm of the new one arrives: the registry cannot tell, and the grace protects it.
    device = connect(stack.broker.port, old, device_id)
    try:
        assert device.connected.is_set(), device.reason
        _listens(device, device_id)
        serial = serial_hex(new.serial)
        assert _confirm(device, device_id, serial, 0) == {"confirmed": serial}
        confirmed_at = time.monotonic()
        assert device.disconnected.wait(GRACE_S + 15), "old-certificate session not dropped"
        assert time.monotonic() - confirmed_at >= GRACE_S - 0.5
    finally:
        device.close()
    again = connect(stack.broker.port, new, device_id)
    try:
        assert again.connected.is_set(), again.reason
    finally:
        again.close()


def _expired_serial_in_file(stack: Lifecycle, serial: str) -> bool:
    """Whether a broker starting from this broker's files (snapshot + journal) would enforce
    ``serial``."""
    assert stack.broker.app is not None
    live = stack.broker.app.revoked
    assert live.folder is not None
    persisted = RevokedSet(live.folder, stack.broker.app.settings.broker_node)
    persisted.load()
    return persisted.is_serial_revoked(serial)


def test_expired_certificate_leaves_the_crl_and_the_revoked_set_not_before_skew(
    stack: Lifecycle,
) -> None:
    device_id = "dev-life-exp"
    leaves_at = utcnow() - CLOCK_SKEW + dt.timedelta(seconds=6)
    issued = stack.pki.ca.issue_client(
        stack.pki.ca.identity(IdentityKind.DEVICE, device_id),
        not_before=utcnow() - dt.timedelta(hours=1),
        not_after=leaves_at,
    )
    not_after = issued.certificate.not_valid_after_utc
    leaves_at = not_after + CLOCK_SKEW
    serial = serial_hex(issued.certificate.serial_number)
    stack.register_pem(issued.certificate_pem.decode())
    response = stack.operator.post(f"/devices/{device_id}/decommission", json={"reason": "test"})
    assert response.status_code == 200, response.text
    assert stack.broker.app is not None
    revoked = stack.broker.app.revoked
    assert wait_for(lambda: revoked.is_serial_revoked(serial), 10)
    # The set is written to disk right after the batch is applied in memory.
    assert wait_for(lambda: _expired_serial_in_file(stack, serial), 10)
    expired_before = stack.broker.metrics.registry.get_sample_value(
        "certfleet_broker_revoked_serials_expired_total"
    )

    # Until not_after + CLOCK_SKEW, it stays everywhere (a slow clock may still accept it).
    while utcnow() < leaves_at - dt.timedelta(seconds=1):
        assert revoked.is_serial_revoked(serial)
        assert _expired_serial_in_file(stack, serial)
        assert stack.crl().get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
        time.sleep(0.5)

    assert wait_for(lambda: not revoked.is_serial_revoked(serial), 10)
    assert utcnow() >= leaves_at
    assert wait_for(lambda: not _expired_serial_in_file(stack, serial), 5)
    assert stack.crl().get_revoked_certificate_by_serial_number(int(serial, 16)) is None
    # The device stays decommissioned for good: a later certificate of it is refused too.
    assert revoked.is_device_decommissioned(device_id)
    expired_after = stack.broker.metrics.registry.get_sample_value(
        "certfleet_broker_revoked_serials_expired_total"
    )
    assert (expired_after or 0) >= (expired_before or 0) + 1


def test_expiry_gauges_move_when_a_device_renews_or_is_decommissioned(stack: Lifecycle) -> None:
    within = {w: {"within": w} for w in ("7d", "30d", "90d")}
    soon_id, dead_id = "dev-life-gauge-soon", "dev-life-gauge-dead"
    base = {
        w: stack.metric("certfleet_certificates_expiring", labels) for w, labels in within.items()
    }
    base_invalid = stack.metric("certfleet_devices_without_valid_certificate")

    # A device whose certificate expires in 3 days, and one whose certificate has expired.
    write_device_bundle(stack.pki.ca, stack.root / "fleet", soon_id)
    soon = stack.pki.ca.issue_client(
        stack.pki.ca.identity(IdentityKind.DEVICE, soon_id),
        not_after=utcnow() + dt.timedelta(days=3),
    )
    write_issued(
        soon, stack.device_dir(soon_id) / "device.crt", stack.device_dir(soon_id) / "device.key"
    )
    stack.register_pem(soon.certificate_pem.decode())
    dead = stack.pki.ca.issue_client(
        stack.pki.ca.identity(IdentityKind.DEVICE, dead_id),
        not_before=utcnow() - dt.timedelta(days=2),
        not_after=utcnow() - dt.timedelta(days=1),
    )
    stack.register_pem(dead.certificate_pem.decode())
    for window in within:
        assert stack.metric("certfleet_certificates_expiring", within[window]) == base[window] + 1
    assert stack.metric("certfleet_devices_without_valid_certificate") == base_invalid + 1

    # Renewed for 120 days: its current certificate now expires after every window.
    stack.renew(soon_id)
    for window in within:
        assert stack.metric("certfleet_certificates_expiring", within[window]) == base[window]

    response = stack.operator.post(f"/devices/{dead_id}/decommission", json={"reason": "gone"})
    assert response.status_code == 200, response.text
    assert stack.metric("certfleet_devices_without_valid_certificate") == base_invalid
    next_expiry = stack.metric("certfleet_certificate_next_expiration_timestamp_seconds")
    assert next_expiry > time.time()


def test_expiry_report_lists_an_expired_device(stack: Lifecycle, tmp_path: Path) -> None:
    device_id = "dev-life-report-expired"
    expired = stack.pki.ca.issue_client(
        stack.pki.ca.identity(IdentityKind.DEVICE, device_id),
        not_before=utcnow() - dt.timedelta(days=2),
        not_after=utcnow() - dt.timedelta(hours=1),
    )
    stack.register_pem(expired.certificate_pem.decode())
    png = tmp_path / "expiry.png"
    command = [
        sys.executable,
        "-m",
        "certfleet.cli",
        "registry",
        "expiry-report",
        "--data-dir",
        str(stack.root / "registry-data"),
        "--registry",
        stack.registry.url,
        "--operator",
        "alice",
        "--limit",
        "1000",
    ]
    env = {"PATH": "/usr/bin:/bin", "CERTFLEET_REGISTRY_TOKEN": "", "MPLBACKEND": "Agg"}
    as_json = subprocess.run(
        [*command, "--json", "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert device_id in [d["device_id"] for d in report["expired"]]
    assert report["buckets"]["expired"] >= 1
    assert sum(report["buckets"].values()) == report["active_devices"]
    assert sum(b["count"] for b in report["histogram"]) == report["active_devices"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert table.returncode == 0, table.stderr
    assert "expired" in table.stdout and device_id in table.stdout


def test_registry_refuses_a_confirm_that_is_not_json_serial(stack: Lifecycle) -> None:
    device_id = "dev-life-badconfirm"
    files = stack.provision(device_id)
    device = connect(stack.broker.port, files, device_id)
    try:
        assert device.connected.is_set(), device.reason
        _listens(device, device_id)
        device.client.publish(renew_topic(device_id), b'{"confirm": 42}', qos=1)
        answers = lambda: [p for t, p in device.messages if t == issued_topic(device_id)]  # noqa: E731
        assert wait_for(lambda: bool(answers()), 15)
        assert json.loads(answers()[0])["error"] == "invalid_confirm"
    finally:
        device.close()


def test_an_expired_device_is_reenrolled_by_an_operator_and_publishes_again(
    stack: Lifecycle, tmp_path: Path
) -> None:
    """The recovery of a device that was off past its not_after: the broker refuses it, it
    cannot renew over MQTT; the operator re-enrolls it from a CSR made on the device
    (``certfleet registry devices reenroll``) and it connects and publishes again."""
    device_id = "dev-life-reenroll"
    expired = stack.pki.ca.issue_client(
        stack.pki.ca.identity(IdentityKind.DEVICE, device_id),
        not_before=utcnow() - dt.timedelta(days=30),
        not_after=utcnow() - dt.timedelta(hours=1),
    )
    stack.register_pem(expired.certificate_pem.decode())
    old = tmp_path / "old"
    write_issued(expired, old / "device.crt", old / "device.key")
    refused = connect(
        stack.broker.port,
        ClientFiles(old / "device.crt", old / "device.key", stack.pki.layout.root_cert, 0),
        device_id,
    )
    refused.close()
    assert not refused.connected.is_set(), "the broker let an expired certificate in"

    key = generate_key()  # on the device: the key never leaves it
    (tmp_path / "device.key").write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    csr = build_csr(key, Identity.device(stack.pki.ca.trust_domain, device_id))
    (tmp_path / "device.csr").write_bytes(csr.public_bytes(Encoding.PEM))
    command = [
        sys.executable, "-m", "certfleet.cli", "registry", "devices", "reenroll", device_id,
        "--csr", str(tmp_path / "device.csr"), "--out", str(tmp_path / "device.crt"),
        "--data-dir", str(stack.root / "registry-data"), "--registry", stack.registry.url,
        "--operator", "alice",
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "CERTFLEET_REGISTRY_TOKEN": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"reenrolled {device_id}: ")

    files = ClientFiles(
        tmp_path / "device.crt", tmp_path / "device.key", stack.pki.layout.root_cert, 0
    )
    device = connect(stack.broker.port, files, device_id)
    try:
        assert device.connected.is_set(), device.reason
        reading = json.dumps({"device_id": device_id, "temperature_c": 21.5})
        sent = device.client.publish(telemetry_topic(device_id), reading, qos=1)
        sent.wait_for_publish(10)
        seen = lambda: stack.operator.get(f"/devices/{device_id}").json()["last_seen_at"]  # noqa: E731
        assert wait_for(lambda: seen() is not None, 15), "the registry never saw its telemetry"
    finally:
        device.close()
    # A second run with another key is refused: the device now renews itself.
    other = build_csr(generate_key(), Identity.device(stack.pki.ca.trust_domain, device_id))
    (tmp_path / "device.csr").write_bytes(other.public_bytes(Encoding.PEM))
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 2, again.stdout
    assert "renews itself over MQTT" in again.stderr


def test_a_device_enrolled_by_claim_over_est_reenrolls_and_its_old_certificate_goes(
    stack: Lifecycle,
) -> None:
    """Zero-touch, end to end: a claim enrolls the device over EST (its key born on it), the
    broker admits the certificate and refuses the claim; the device re-enrolls over EST
    with that certificate, connects with the new one and confirms it; the old one is
    revoked as superseded after the grace and refused by the broker."""
    from factory.claims import AllowEntry
    from tests.registry.est_client import csr_der, enroll, est_client, make_claim
    from tests.registry.est_client import parse_certs_only as certs

    device_id, serial = "dev-est-1", "SN-EST-1"
    folder = stack.root / "est"
    folder.mkdir()
    claim = make_claim(
        stack.pki, stack.operator, folder, "batch-est", allow=[AllowEntry(device_id, serial)]
    )

    def issued(name: str, certificate: x509.Certificate, key: object) -> ClientFiles:
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(certificate.public_bytes(Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())  # type: ignore[attr-defined]
        )
        return ClientFiles(
            cert_path, key_path, stack.pki.layout.root_cert, certificate.serial_number
        )

    first_csr, first_key = csr_der(hardware_serial=serial)  # it knows only its serial
    with est_client(stack.pki, stack.registry.url, (claim.cert, claim.key)) as est:
        (first_cert,) = certs(enroll(est, first_csr))
    old = issued("first", first_cert, first_key)
    refused = connect(
        stack.broker.port,
        ClientFiles(claim.cert, claim.key, stack.pki.layout.root_cert, claim.serial),
        device_id,
    )
    try:
        assert not refused.connected.is_set(), "the claim certificate was let in"
    finally:
        refused.close()
    device = connect(stack.broker.port, old, device_id)
    try:
        assert device.connected.is_set(), device.reason
    finally:
        device.close()

    time.sleep(1.1)  # "newest" is the latest not_before, which X.509 keeps to the second
    second_csr, second_key = csr_der(device_id=device_id)
    with est_client(stack.pki, stack.registry.url, (old.cert, old.key)) as est:
        (second_cert,) = certs(enroll(est, second_csr, "/simplereenroll"))
    new = issued("second", second_cert, second_key)
    old_serial, new_serial = serial_hex(old.serial), serial_hex(new.serial)

    device = connect(stack.broker.port, new, device_id)
    try:
        assert device.connected.is_set(), device.reason
        _listens(device, device_id)
        assert _confirm(device, device_id, new_serial, 0) == {"confirmed": new_serial}
        revoked = stack.broker.app.revoked if stack.broker.app is not None else None
        assert revoked is not None
        assert wait_for(lambda: revoked.is_serial_revoked(old_serial), GRACE_S + 15)
        assert not device.disconnected.is_set(), device.reason
    finally:
        device.close()
    again = connect(stack.broker.port, old, device_id)
    try:
        assert not again.connected.is_set(), "the superseded certificate was let in"
    finally:
        again.close()
    body = stack.operator.get(f"/devices/{device_id}").json()
    by_serial = {c["serial"]: c for c in body["certificates"]}
    assert by_serial[old_serial]["revocation_reason"] == "superseded"
    assert by_serial[new_serial]["status"] == "live"
    assert body["hardware_serial"] == serial


def test_sim_devices_enroll_by_claim_over_est_publish_and_a_stranger_is_refused(
    stack: Lifecycle, tmp_path: Path
) -> None:
    """`certfleet sim run --enroll est`: five devices knowing only their hardware serial and
    the batch's claim enroll over EST, connect with their new certificates and their
    telemetry reaches the registry (last seen); a sixth serial outside the allow-list is
    refused with one line and counted, and the run goes on."""
    from factory.claims import AllowEntry
    from tests.registry.est_client import make_claim

    allowed = [AllowEntry(f"zt-{index}", f"SN-ZT-{index}") for index in range(1, 6)]
    claim = make_claim(stack.pki, stack.operator, tmp_path, "batch-sim", allow=allowed)
    claim_dir = tmp_path / "claims" / "batch-sim"  # as factory.claims.write_claim lays it out
    claim_dir.mkdir(parents=True)
    shutil.copy(claim.cert, claim_dir / "claim.crt")
    shutil.copy(claim.key, claim_dir / "claim.key")
    shutil.copy(stack.pki.layout.chain, claim_dir / "chain.pem")
    shutil.copy(stack.pki.layout.root_cert, claim_dir / "root.crt")
    serials = tmp_path / "serials.txt"
    serials.write_text(
        "# the line's serials\n"
        + "".join(f"{e.hardware_serial}\n" for e in allowed)
        + "SN-STRANGER\n"
    )

    result = subprocess.run(
        [
            sys.executable, "-m", "certfleet.cli", "sim", "run", "--enroll", "est",
            "--claim", str(claim_dir), "--serials", str(serials),
            "--data-dir", str(tmp_path / "fleet"), "--registry-url", stack.registry.url,
            "--broker", f"127.0.0.1:{stack.broker.port}", "--workers", "0",
            "--duration", "3", "--rate", "2", "--no-renew", "--json",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["enrollment"]["enrolled"] == 5, summary["enrollment"]
    assert summary["enrollment"]["refused"] == 1
    assert summary["enrollment"]["refused_by_reason"] == {"forbidden": 1}
    refusals = [line for line in result.stderr.splitlines() if "enrollment refused" in line]
    assert len(refusals) == 1, result.stderr
    assert refusals[0].startswith("device SN-STRANGER: enrollment refused (403)"), refusals
    assert summary["devices_connected_ever"] == 5, summary
    assert summary["messages_acknowledged"] >= 5, summary
    for entry in allowed:
        bundle = tmp_path / "fleet" / "devices" / entry.device_id
        assert (bundle / "device.key").stat().st_mode & 0o777 == 0o600
        info = json.loads((bundle / "device.json").read_text())
        assert info["hardware_serial"] == entry.hardware_serial

        def seen(device_id: str = entry.device_id) -> bool:
            body = stack.operator.get(f"/devices/{device_id}").json()
            return body["last_seen_at"] is not None and body["hardware_serial"] is not None

        assert wait_for(seen, 15), f"{entry.device_id}'s telemetry did not reach the registry"
    assert stack.operator.get("/devices/SN-STRANGER").status_code == 404
