"""Certificate renewal over MQTT, end to end: our broker, the registry (answering CSRs through
its MQTT service client) and real paho devices. Every refusal is answered on
``devices/<id>/cert/issued`` and surfaces on the device as RenewalRefusedError."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlmodel import Session, select

from broker.server import BrokerServer
from device_sim.bundle import DeviceBundle
from device_sim.renew import (
    RenewalFailedError,
    RenewalRefusedError,
    renew_bundle,
    request_certificate,
)
from fleetcore.keys import build_csr, generate_key
from fleetcore.profile import Identity, serial_hex
from registry.models import AuditLog
from registry.renewal import RenewalRefused, device_of_renew_topic
from registry.renewal_service import RenewalService
from registry.server import RegistryServer
from registry.telemetry import TelemetryIngest
from tests.support.mqtt import connect
from tests.support.pki import (
    TRUST_DOMAIN,
    ClientFiles,
    TestPKI,
    registry_data_dir,
    write_device_bundle,
)
from tests.support.ports import free_port
from tests.support.servers import (
    certfleet_broker_settings,
    mqtt_registry_settings,
    operator_client,
)

# The old name, for older imports (tests.support.pki has it now).
_registry_data_dir = registry_data_dir

PEM = serialization.Encoding.PEM
MIN_INTERVAL_S = 120.0


@dataclass
class Stack:
    pki: TestPKI
    fleet_dir: Path
    broker: BrokerServer
    registry: RegistryServer
    operator: httpx.Client

    @property
    def ingest(self) -> TelemetryIngest:
        ingest: TelemetryIngest = self.registry.app.state.telemetry_ingest
        return ingest

    @property
    def renewal(self) -> RenewalService:
        assert self.ingest.renewal is not None
        return self.ingest.renewal

    def bundle_dir(self, device_id: str) -> Path:
        return self.fleet_dir / "devices" / device_id

    def provision(self, device_id: str, *, register: bool = True) -> Path:
        write_device_bundle(self.pki.ca, self.fleet_dir, device_id)
        directory = self.bundle_dir(device_id)
        if register:
            response = self.operator.post(
                "/devices", json={"certificate_pem": (directory / "device.crt").read_text()}
            )
            assert response.status_code == 201, response.text
        return directory

    def renew(self, device_id: str) -> x509.Certificate:
        directory = self.bundle_dir(device_id)
        renew_bundle(directory, "127.0.0.1", self.broker.port, timeout=20)
        return x509.load_pem_x509_certificate((directory / "device.crt").read_bytes())

    def send_csr(self, device_id: str, csr_pem: bytes) -> x509.Certificate:
        bundle = DeviceBundle.load(self.bundle_dir(device_id))
        return request_certificate(bundle, "127.0.0.1", self.broker.port, csr_pem, timeout=20)


@pytest.fixture(scope="module")
def stack(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("renewal")
    with BrokerServer(certfleet_broker_settings(pki, root / "broker-data")) as broker:
        data_dir = registry_data_dir(pki, root / "registry-data")
        settings = mqtt_registry_settings(
            data_dir, broker.port, registry_renewal_min_interval_s=MIN_INTERVAL_S
        )
        with RegistryServer(settings) as registry, operator_client(pki, registry.url) as operator:
            made = Stack(pki, root / "fleet", broker, registry, operator)
            assert made.ingest.subscribed.wait(15), "registry did not subscribe to the broker"
            yield made


def _serial(certificate: x509.Certificate) -> str:
    return serial_hex(certificate.serial_number)


def test_device_renews_and_reconnects_with_the_new_certificate(stack: Stack) -> None:
    directory = stack.provision("dev-renew-1")
    old = x509.load_pem_x509_certificate((directory / "device.crt").read_bytes())
    old_key = (directory / "device.key").read_bytes()

    new = stack.renew("dev-renew-1")

    assert _serial(new) != _serial(old)
    assert new.public_key() != old.public_key()
    assert (directory / "device.key").read_bytes() != old_key
    assert (directory / "device.key").stat().st_mode & 0o777 == 0o600
    assert (directory / "previous" / "device.key").read_bytes() == old_key
    meta = json.loads((directory / "device.json").read_text())
    assert meta["serial"] == _serial(new)
    assert meta["not_after"] == new.not_valid_after_utc.isoformat()
    # Same validity length as the certificate it replaces.
    assert (new.not_valid_after_utc - new.not_valid_before_utc) == (
        old.not_valid_after_utc - old.not_valid_before_utc
    )

    files = ClientFiles(
        directory / "device.crt", directory / "device.key", directory / "root.crt", 0
    )
    probe = connect(stack.broker.port, files, "dev-renew-1")
    try:
        assert probe.connected.is_set(), probe.reason
    finally:
        probe.close()

    body = stack.operator.get("/devices/dev-renew-1").json()
    certificates = {c["serial"]: c["status"] for c in body["certificates"]}
    # The old certificate stays live until it expires: the device may still be using it.
    assert certificates == {_serial(old): "live", _serial(new): "live"}
    metrics = stack.operator.get("/metrics").text
    assert 'certfleet_registry_renewals_total{outcome="issued"}' in metrics
    with Session(stack.registry.state.engine) as session:
        entries = session.exec(
            select(AuditLog).where(AuditLog.action == "renew", AuditLog.target == "dev-renew-1")
        ).all()
    assert [(e.who, (e.detail or {}).get("serial")) for e in entries] == [
        (f"spiffe://{TRUST_DOMAIN}/service/registry", _serial(new))
    ]


def _csr_for(device_id: str, key: object | None = None) -> bytes:
    private_key = key if key is not None else generate_key()
    identity = Identity.device(TRUST_DOMAIN, device_id)
    return build_csr(private_key, identity).public_bytes(PEM)  # type: ignore[arg-type]


def _tampered_csr(device_id: str) -> bytes:
    der = bytearray(
        x509.load_pem_x509_csr(_csr_for(device_id)).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte of the ECDSA signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(PEM)


@pytest.mark.parametrize(
    ("make_csr", "error", "message"),
    [
        (lambda: _csr_for("dev-someone-else"), "identity_mismatch", "names device 'dev-some"),
        (lambda: _tampered_csr("dev-renew-2"), "invalid_csr", "CSR signature does not verify"),
        (
            lambda: _csr_for(
                "dev-renew-2", rsa.generate_private_key(public_exponent=65537, key_size=1024)
            ),
            "invalid_csr",
            "RSA key of 1024 bits is too weak",
        ),
        (lambda: b"hello, not a CSR", "invalid_csr", "not a certificate signing request"),
    ],
    ids=["other-device", "bad-signature", "weak-key", "not-a-csr"],
)
def test_registry_refuses_a_bad_csr(
    stack: Stack, make_csr: object, error: str, message: str
) -> None:
    if not stack.bundle_dir("dev-renew-2").exists():
        stack.provision("dev-renew-2")
    before = stack.renewal.counters[error]
    with pytest.raises(RenewalRefusedError, match=message) as refused:
        stack.send_csr("dev-renew-2", make_csr())  # type: ignore[operator]
    assert refused.value.error == error
    assert stack.renewal.counters[error] == before + 1  # counted (and logged) by the registry
    certificates = stack.operator.get("/devices/dev-renew-2").json()["certificates"]
    assert len(certificates) == 1  # nothing was issued


def test_registry_refuses_a_decommissioned_device(stack: Stack) -> None:
    directory = stack.provision("dev-renew-3")
    before = (directory / "device.crt").read_bytes()
    response = stack.operator.post("/devices/dev-renew-3/decommission", json={"reason": "stolen"})
    assert response.status_code == 200, response.text
    # This broker does not follow the feed, so the revoked device can still reach the
    # registry: the registry itself must refuse.
    with pytest.raises(RenewalRefusedError, match="dev-renew-3 is decommissioned") as refused:
        stack.renew("dev-renew-3")
    assert refused.value.error == "device_decommissioned"
    assert (directory / "device.crt").read_bytes() == before  # the bundle is untouched


def test_registry_refuses_an_unregistered_device(stack: Stack) -> None:
    stack.provision("dev-renew-4", register=False)
    with pytest.raises(RenewalRefusedError, match="dev-renew-4 is not registered") as refused:
        stack.renew("dev-renew-4")
    assert refused.value.error == "unknown_device"


def _cli(stack: Stack, device_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "sim",
            "renew",
            "--device",
            device_id,
            "--data-dir",
            str(stack.fleet_dir),
            "--broker",
            f"127.0.0.1:{stack.broker.port}",
            "--timeout",
            "20",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_second_renewal_within_the_interval_is_rate_limited(stack: Stack) -> None:
    directory = stack.provision("dev-renew-5")
    first = _cli(stack, "dev-renew-5")
    assert first.returncode == 0, first.stderr
    renewed = json.loads(first.stdout)
    assert renewed["serial"] == json.loads((directory / "device.json").read_text())["serial"]

    second = _cli(stack, "dev-renew-5")
    assert second.returncode == 2
    assert second.stdout == ""
    assert "at most one renewal per 120 s" in second.stderr, second.stderr
    assert second.stderr.count("\n") == 1, second.stderr  # one line, no traceback
    assert json.loads((directory / "device.json").read_text())["serial"] == renewed["serial"]


def test_a_redelivered_csr_gets_the_same_certificate(stack: Stack) -> None:
    stack.provision("dev-renew-6")
    csr = _csr_for("dev-renew-6")
    first = stack.send_csr("dev-renew-6", csr)
    again = stack.send_csr("dev-renew-6", csr)
    assert _serial(again) == _serial(first)
    certificates = stack.operator.get("/devices/dev-renew-6").json()["certificates"]
    assert len(certificates) == 2  # the provisioned one and one renewal, not two


def test_device_without_an_answer_gets_a_clear_error_and_keeps_its_bundle(
    pki: TestPKI, tmp_path: Path
) -> None:
    write_device_bundle(pki.ca, tmp_path / "fleet", "dev-renew-7")
    directory = tmp_path / "fleet" / "devices" / "dev-renew-7"
    before = sorted(p.name for p in directory.iterdir())
    # A broker with no registry behind it: nobody answers.
    lonely_settings = certfleet_broker_settings(pki, tmp_path / "broker-data")
    with (
        BrokerServer(lonely_settings) as lonely,
        pytest.raises(RenewalFailedError, match=r"no answer on devices/dev-renew-7/cert/is"),
    ):
        renew_bundle(directory, "127.0.0.1", lonely.port, timeout=1)
    with pytest.raises(RenewalFailedError, match="cannot connect to the broker"):
        renew_bundle(directory, "127.0.0.1", free_port(), timeout=1)
    assert sorted(p.name for p in directory.iterdir()) == before


@pytest.mark.parametrize(
    "topic",
    ["devices/dev-1/cert/issued", "devices/+/cert/renew", "devices/../cert/renew", "x/dev-1"],
)
def test_renew_topic_must_name_one_device(topic: str) -> None:
    with pytest.raises(RenewalRefused, match="is not devices/<id>/cert/renew"):
        device_of_renew_topic(topic)


def test_a_retained_renewal_request_is_not_answered_again_on_resubscribe(stack: Stack) -> None:
    """A device publishes its CSR with retain. A registry process that subscribes later (a
    restart, a second process) must not mint for it again: retained requests are ignored,
    and the rate limit lives in the database, not in the first process's memory."""
    from tests.support.waits import wait_for

    device_id = "dev-renew-retained"
    directory = stack.provision(device_id)
    issued_before = stack.renewal.counters["issued"]
    device = connect(
        stack.broker.port,
        (directory / "device.crt", directory / "device.key"),
        device_id,
        root=directory / "root.crt",
    )
    assert device.connected.is_set(), device.reason
    try:
        device.client.publish(
            f"devices/{device_id}/cert/renew", _csr_for(device_id), qos=1, retain=True
        ).wait_for_publish(10)
        assert wait_for(lambda: stack.renewal.counters["issued"] == issued_before + 1)
    finally:
        device.client.disconnect()
        device.client.loop_stop()
    state = stack.registry.state
    second = TelemetryIngest(state.settings, state.engine, ca=state.ca).start()
    try:
        assert second.subscribed.wait(15), "the second registry client did not subscribe"
        time.sleep(1.0)  # a retained message arrives right after the SUBACK
        assert second.renewal is not None
        assert sum(second.renewal.counters.values()) == 0, second.renewal.counters
    finally:
        second.stop_sync()
    certificates = stack.operator.get(f"/devices/{device_id}").json()["certificates"]
    assert len(certificates) == 2  # the provisioned one and one renewal
