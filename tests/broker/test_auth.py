"""Who gets in: every refusal reason over a real socket, with its counted reason."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.auth import AdmissionPolicy, Refusal, RefusedError
from broker.revocation import RevokedSet
from broker.server import BrokerServer
from factory.ca import CertificateAuthority, IssuedCertificate, write_issued
from fleetcore.clock import utcnow
from fleetcore.keys import generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import TRUST_DOMAIN, ClientFiles, TestPKI, issue_device
from tests.support.servers import broker_data_dir, broker_settings
from tests.support.waits import wait_for


def assert_refused(
    broker: BrokerServer,
    files: ClientFiles | tuple[Path | None, Path | None],
    client_id: str,
    reason: Refusal,
    root: Path | None = None,
) -> MqttProbe:
    before = broker.metrics.refusal_count(reason.value)
    sessions = broker.metrics.registry.get_sample_value("certfleet_broker_connections")
    probe = connect(broker.port, files, client_id, root=root)
    try:
        assert not probe.connected.is_set(), f"{client_id} was let in"
        assert wait_for(lambda: broker.metrics.refusal_count(reason.value) == before + 1), (
            f"refusal {reason.value} not counted; client saw {probe.reason}"
        )
        now_open = broker.metrics.registry.get_sample_value("certfleet_broker_connections")
        assert now_open == sessions
    finally:
        probe.close()
    return probe


def custom_leaf(
    pki: TestPKI,
    directory: Path,
    name: str,
    *,
    uris: list[str],
    self_signed: bool = False,
) -> ClientFiles:
    """A clientAuth leaf with arbitrary URI SANs (for the identity-profile refusals)."""
    key = generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key = key if self_signed else pki.ca.issuing_key
    issuer_name = subject if self_signed else pki.ca.issuing_cert.subject
    now = utcnow()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    certificate = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    cert, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    write_issued(IssuedCertificate(certificate, key), cert, key_path)
    return ClientFiles(cert, key_path, pki.layout.root_cert, certificate.serial_number)


def test_broker_admits_device_whose_client_id_is_its_device_id(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    probe = connect(broker.port, issue_device(pki, tmp_path, "dev-a1"), "dev-a1")
    try:
        assert probe.connected.is_set(), probe.reason
    finally:
        probe.close()


def test_broker_rejects_client_without_certificate(pki: TestPKI, broker: BrokerServer) -> None:
    assert_refused(broker, (None, None), "dev-anon", Refusal.NO_CERTIFICATE, pki.layout.root_cert)


def test_broker_rejects_self_signed_certificate(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    files = custom_leaf(
        pki,
        tmp_path,
        "dev-self",
        uris=[f"spiffe://{TRUST_DOMAIN}/device/dev-self"],
        self_signed=True,
    )
    assert_refused(broker, files, "dev-self", Refusal.SELF_SIGNED)


def test_broker_rejects_certificate_from_another_ca(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    other = CertificateAuthority.init(DataLayout(tmp_path / "other-ca"), TRUST_DOMAIN)
    files = issue_device(pki, tmp_path, "dev-foreign", ca=other)
    assert_refused(broker, files, "dev-foreign", Refusal.UNKNOWN_CA)


def test_broker_rejects_expired_certificate(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    now = utcnow()
    files = issue_device(
        pki,
        tmp_path,
        "dev-old",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    assert_refused(broker, files, "dev-old", Refusal.EXPIRED)


def test_broker_rejects_not_yet_valid_certificate(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    now = utcnow()
    files = issue_device(
        pki,
        tmp_path,
        "dev-future",
        not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=30),
    )
    assert_refused(broker, files, "dev-future", Refusal.NOT_YET_VALID)


def test_broker_rejects_server_certificate_used_as_client(
    pki: TestPKI, broker: BrokerServer
) -> None:
    cert, key = pki.layout.server_cert("broker"), pki.layout.server_key("broker")
    assert_refused(
        broker, (cert, key), "broker", Refusal.NOT_CLIENT_CERTIFICATE, pki.layout.root_cert
    )


def test_broker_rejects_ca_certificate_used_as_client(pki: TestPKI, broker: BrokerServer) -> None:
    assert_refused(
        broker,
        (pki.layout.issuing_cert, pki.layout.issuing_key),
        "issuing",
        Refusal.CA_CERTIFICATE,
        pki.layout.root_cert,
    )


def test_broker_rejects_certificate_without_identity_uri(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    files = custom_leaf(pki, tmp_path, "dev-nouri", uris=[])
    assert_refused(broker, files, "dev-nouri", Refusal.BAD_IDENTITY)


def test_broker_rejects_certificate_with_two_identity_uris(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    files = custom_leaf(
        pki,
        tmp_path,
        "dev-two",
        uris=[f"spiffe://{TRUST_DOMAIN}/device/dev-two", f"spiffe://{TRUST_DOMAIN}/device/dev-3"],
    )
    assert_refused(broker, files, "dev-two", Refusal.BAD_IDENTITY)


def test_broker_rejects_client_id_different_from_device_id(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-b1")
    assert_refused(broker, files, "dev-b2", Refusal.CLIENT_ID_MISMATCH)


def test_broker_rejects_operator_certificate(pki: TestPKI, broker: BrokerServer) -> None:
    assert_refused(broker, pki.client(IdentityKind.OPERATOR, "alice"), "alice", Refusal.OPERATOR)


def test_broker_rejects_claim_certificate_at_connect(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    """A batch's claim certificate enrolls devices over EST and nothing else: no telemetry,
    whatever client id it connects with (its batch name, or a device's)."""
    from factory.claims import mint_claim

    issued, _record = mint_claim(
        pki.ca, "batch-mqtt", quota=5, lifetime=dt.timedelta(days=1), allow=[]
    )
    cert, key = tmp_path / "claim.crt", tmp_path / "claim.key"
    write_issued(issued, cert, key)
    files = ClientFiles(cert, key, pki.layout.root_cert, issued.certificate.serial_number)
    assert_refused(broker, files, "batch-mqtt", Refusal.CLAIM)
    assert_refused(broker, files, "dev-from-claim", Refusal.CLAIM)


def test_broker_rejects_revoked_certificate(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    files = issue_device(pki, tmp_path, "dev-r1")
    broker.revoke([format(files.serial, "x")])
    assert_refused(broker, files, "dev-r1", Refusal.REVOKED)


def test_broker_rejects_new_certificate_of_decommissioned_device(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    (tmp_path / "old").mkdir()
    old = issue_device(pki, tmp_path / "old", "dev-d1")
    broker.revoke([format(old.serial, "x")], device_id="dev-d1")
    fresh = issue_device(pki, tmp_path, "dev-d1")  # minted after the decommission
    assert_refused(broker, fresh, "dev-d1", Refusal.DECOMMISSIONED)


def test_refused_client_id_claim_leaves_the_real_device_session_alone(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    """amqtt deletes a clean session's old subscriptions before asking auth plugins; our gate
    refuses the impostor before amqtt sees its CONNECT."""
    victim = connect(broker.port, issue_device(pki, tmp_path, "dev-v1"), "dev-v1")
    publisher = connect(broker.port, issue_device(pki, tmp_path, "dev-v1b"), "dev-v1b")
    try:
        assert victim.connected.is_set() and publisher.connected.is_set()
        victim.client.subscribe("devices/dev-v1/cert/issued", qos=1)
        assert victim.subscribed.wait(5)
        assert_refused(
            broker, issue_device(pki, tmp_path, "dev-evil"), "dev-v1", Refusal.CLIENT_ID_MISMATCH
        )
        service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
        try:
            service.client.publish("devices/dev-v1/cert/issued", b"cert", qos=1).wait_for_publish(5)
            assert wait_for(lambda: victim.messages == [("devices/dev-v1/cert/issued", b"cert")])
        finally:
            service.close()
    finally:
        victim.close()
        publisher.close()


def test_broker_cuts_tls_client_that_stalls_mid_handshake(pki: TestPKI, tmp_path: Path) -> None:
    layout = broker_data_dir(pki, tmp_path / "data")
    with (
        BrokerServer(broker_settings(layout, broker_handshake_timeout_s=0.3)) as broker,
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as stalled,
    ):
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then silence
        assert wait_for(lambda: broker.metrics.refusal_count(Refusal.HANDSHAKE_TIMEOUT.value) == 1)
        assert stalled.recv(100) == b""  # the broker closed it


def test_broker_cuts_client_that_never_sends_connect(pki: TestPKI, tmp_path: Path) -> None:
    layout = broker_data_dir(pki, tmp_path / "data")
    files = issue_device(pki, tmp_path, "dev-silent")
    with BrokerServer(broker_settings(layout, broker_connect_timeout_s=0.3)) as broker:
        context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
        context.load_cert_chain(str(files.cert), str(files.key))
        with (
            socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert wait_for(
                lambda: broker.metrics.refusal_count(Refusal.CONNECT_TIMEOUT.value) == 1
            )
            assert tls.recv(100) == b""


class _NothingRevoked:
    def is_serial_revoked(self, serial: str) -> bool:
        return False

    def is_device_decommissioned(self, device_id: str) -> bool:
        return False


def test_policy_refuses_identity_from_another_trust_domain(pki: TestPKI, tmp_path: Path) -> None:
    other = CertificateAuthority.init(DataLayout(tmp_path / "ca2"), "other.test")
    issued = other.issue_client(other.identity(IdentityKind.DEVICE, "dev-x"))
    policy = AdmissionPolicy(TRUST_DOMAIN, _NothingRevoked())
    der = issued.certificate.public_bytes(Encoding.DER)
    with pytest.raises(RefusedError, match="outside trust domain fleet.test"):
        policy.admit(der, "dev-x")


def test_revoked_set_survives_restart(tmp_path: Path) -> None:
    first = RevokedSet(tmp_path)
    first.add(["ABC1"], "dev-1", seq=7)
    first.save()
    second = RevokedSet(tmp_path)
    second.load()
    assert second.is_serial_revoked("abc1") and second.is_device_decommissioned("dev-1")
    assert second.last_seq == 7
