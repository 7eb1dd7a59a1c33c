"""EST (RFC 7030 / RFC 8951) on a real HTTPS registry, SQLite and PostgreSQL: claims,
one-time secrets, re-enrollment, and every refusal with its clear error."""

from __future__ import annotations

import base64
import datetime as dt
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlmodel import Session, select

from factory.ca import IssuedCertificate, write_issued
from factory.claims import AllowEntry
from fleetcore.profile import IdentityKind, read_identity, serial_hex
from registry.est.models import Claim, ClaimAllow
from registry.models import AuditLog, Device
from registry.server import RegistryServer
from registry.store import claims as claim_store
from registry.store.audit import Actor
from tests.conftest import TestPKI
from tests.registry.conftest import Clients, unique_id
from tests.registry.est_client import (
    ClaimFiles,
    csr_der,
    enroll,
    est_client,
    make_claim,
    parse_certs_only,
)

DAY = dt.timedelta(days=1)


@pytest.fixture
def factory(clients: Clients) -> httpx.Client:
    """The factory's service identity: it records claims, as it registers devices."""
    return clients.of(IdentityKind.SERVICE, "factory")


def _claim_client(pki: TestPKI, registry: RegistryServer, claim: ClaimFiles) -> httpx.Client:
    return est_client(pki, registry.url, (claim.cert, claim.key))


def _refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/plain")
    for word in words:
        assert word in response.text, response.text


def _enroll_device(
    pki: TestPKI, registry: RegistryServer, claim: ClaimFiles, device_id: str, tmp_path: Path
) -> tuple[Path, Path]:
    """Enroll ``device_id`` with ``claim``; its certificate and key files."""
    der, key = csr_der(device_id=device_id)
    with _claim_client(pki, registry, claim) as est:
        (certificate,) = parse_certs_only(enroll(est, der))
    cert_path, key_path = tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key"
    write_issued(IssuedCertificate(certificate, key), cert_path, key_path)
    return cert_path, key_path


def test_cacerts_and_csrattrs_answer_as_rfc_7030_says(
    pki: TestPKI, registry: RegistryServer
) -> None:
    with est_client(pki, registry.url) as est:
        certificates = parse_certs_only(est.get("/cacerts"))
        labelled = parse_certs_only(est.get("/line-7/cacerts"))
        attrs = est.get("/csrattrs")
    expected = {pki.ca.issuing_cert, pki.ca.root_cert}  # a SET OF: DER order, not ours
    assert set(certificates) == expected == set(labelled) and len(certificates) == 2
    assert attrs.status_code == 200
    assert attrs.headers["content-type"] == "application/csrattrs"
    der = base64.b64decode(attrs.content)
    assert der[0] == 0x30 and bytes.fromhex("06082a8648ce3d030107") in der  # secp256r1


def test_a_claim_enrolls_a_device_on_its_allow_list_registered_with_an_audit_entry(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    batch, device_id = unique_id("batch"), unique_id()
    claim = make_claim(
        pki, factory, tmp_path, batch, allow=[AllowEntry(device_id, f"HW-{device_id}")]
    )
    der, key = csr_der(device_id=device_id, uri=True)
    with _claim_client(pki, registry, claim) as est:
        response = enroll(est, der, "/line-7/simpleenroll")
    (certificate,) = parse_certs_only(response)
    assert response.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    identity = read_identity(certificate)
    assert (identity.kind, identity.name) == (IdentityKind.DEVICE, device_id)
    assert certificate.public_key() == key.public_key()
    with Session(registry.state.engine) as session:
        device = session.get(Device, device_id)
        assert device is not None and device.hardware_serial == f"HW-{device_id}"
        entry = session.exec(
            select(AuditLog).where(AuditLog.target == device_id, AuditLog.action == "enroll")
        ).one()
        claim_row = session.get(Claim, batch)
        assert claim_row is not None and claim_row.enrolled == 1
    assert entry.detail is not None and entry.detail["claim"] == batch
    assert entry.detail["serial"] == serial_hex(certificate.serial_number)
    assert entry.who == f"spiffe://fleet.test/claim/{batch}"


def test_the_same_key_again_gets_the_same_certificate_and_a_taken_id_or_serial_is_refused(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    device_id, serial = unique_id(), unique_id("SN")
    claim = make_claim(
        pki, factory, tmp_path, unique_id("batch"), quota=5, allow=[AllowEntry(device_id, serial)]
    )
    der, _ = csr_der(device_id=device_id, hardware_serial=serial)
    with _claim_client(pki, registry, claim) as est:
        (first,) = parse_certs_only(enroll(est, der))
        (again,) = parse_certs_only(enroll(est, der))  # its answer was lost: asked again
        other_key = enroll(est, csr_der(device_id=device_id)[0])
    assert again.serial_number == first.serial_number
    _refused(other_key, 409, f"device {device_id} is enrolled already")
    any_claim = make_claim(pki, factory, tmp_path, unique_id("batch"), quota=5)
    with _claim_client(pki, registry, any_claim) as est:
        taken_serial = enroll(est, csr_der(device_id=unique_id(), hardware_serial=serial)[0])
    _refused(taken_serial, 409, f"hardware serial {serial} belongs to device {device_id}")
    with Session(registry.state.engine) as session:
        row, other = session.get(Claim, claim.batch), session.get(Claim, any_claim.batch)
        assert row is not None and row.enrolled == 1  # spent once, not by the repeat
        assert other is not None and other.enrolled == 0  # a refused INSERT spends nothing
        entry = session.exec(select(ClaimAllow).where(ClaimAllow.batch == claim.batch)).one()
        assert entry.enrolled_at is not None


def test_a_device_asking_by_hardware_serial_gets_the_id_the_allow_list_binds(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    device_id, serial = unique_id(), unique_id("SN")
    claim = make_claim(
        pki, factory, tmp_path, unique_id("batch"), allow=[AllowEntry(device_id, serial)]
    )
    der, _ = csr_der(hardware_serial=serial)
    with _claim_client(pki, registry, claim) as est:
        (certificate,) = parse_certs_only(enroll(est, der))
    assert read_identity(certificate).name == device_id


def test_a_claim_refuses_a_device_outside_its_allow_list_and_a_csr_naming_another(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    allowed, serial = unique_id(), unique_id("SN")
    claim = make_claim(
        pki, factory, tmp_path, unique_id("batch"), allow=[AllowEntry(allowed, serial)]
    )
    with _claim_client(pki, registry, claim) as est:
        outsider = enroll(est, csr_der(device_id=unique_id("intruder"))[0])
        # the serial on the list, but a device id of the CSR's own choosing
        other_id = enroll(est, csr_der(device_id="dev-chosen", hardware_serial=serial)[0])
        no_identity = enroll(est, csr_der()[0])
    _refused(outsider, 403, "not on claim", "allow-list")
    _refused(other_id, 403, f"binds that hardware serial to device {allowed}")
    _refused(no_identity, 403, "naming nobody")


def test_a_claim_never_enrolls_more_than_its_quota_under_20_concurrent_enrollments(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    quota = 5
    batch = unique_id("batch")
    claim = make_claim(pki, factory, tmp_path, batch, quota=quota)
    statuses: list[int] = []
    lock = threading.Lock()
    csrs = [csr_der(device_id=unique_id())[0] for _ in range(20)]
    start = threading.Barrier(20)

    def one(der: bytes) -> None:
        with _claim_client(pki, registry, claim) as est:
            start.wait()
            response = enroll(est, der)
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=one, args=(der,)) for der in csrs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200] * quota + [403] * (20 - quota)
    with Session(registry.state.engine) as session:
        claim_row = session.get(Claim, batch)
        assert claim_row is not None and claim_row.enrolled == quota
        enrolled = session.exec(
            select(AuditLog).where(AuditLog.action == "enroll", AuditLog.who.endswith(batch))
        ).all()
    assert len(enrolled) == quota
    with _claim_client(pki, registry, claim) as est:
        _refused(enroll(est, csr_der(device_id=unique_id())[0]), 403, "quota of 5")


def test_a_revoked_or_expired_claim_enrolls_nobody(
    pki: TestPKI,
    registry: RegistryServer,
    factory: httpx.Client,
    operator: httpx.Client,
    tmp_path: Path,
) -> None:
    revoked = make_claim(pki, factory, tmp_path, unique_id("batch"))
    response = operator.post(f"/claims/{revoked.batch}/revoke", json={"reason": "leaked"})
    assert response.status_code == 200 and response.json()["revoked_at"], response.text
    expired = make_claim(
        pki, factory, tmp_path, unique_id("batch"), expires_at=dt.datetime.now(dt.UTC) - DAY
    )
    with _claim_client(pki, registry, revoked) as est:
        _refused(enroll(est, csr_der(device_id=unique_id())[0]), 403, "was revoked")
    with _claim_client(pki, registry, expired) as est:
        _refused(enroll(est, csr_der(device_id=unique_id())[0]), 403, "expired")


def test_a_device_certificate_is_refused_where_a_claim_is_due_and_the_reverse(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    claim = make_claim(pki, factory, tmp_path, unique_id("batch"))
    device_id = unique_id()
    device_files = _enroll_device(pki, registry, claim, device_id, tmp_path)
    with est_client(pki, registry.url, device_files) as est:
        _refused(
            enroll(est, csr_der(device_id=unique_id())[0]), 403, "device certificate", "re-enrolls"
        )
    with _claim_client(pki, registry, claim) as est:
        _refused(
            enroll(est, csr_der(device_id=device_id)[0], "/simplereenroll"),
            403,
            "claim certificate",
            "simpleenroll",
        )
    operator_files = pki.client(IdentityKind.OPERATOR, "alice")
    with est_client(pki, registry.url, (operator_files.cert, operator_files.key)) as est:
        _refused(enroll(est, csr_der(device_id=unique_id())[0]), 403, "may not enroll")
    with est_client(pki, registry.url) as est:
        response = enroll(est, csr_der(device_id=unique_id())[0])
    _refused(response, 401, "claim certificate")
    assert response.headers["www-authenticate"].startswith("Basic")


def test_a_claim_certificate_is_refused_by_the_operator_api(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    claim = make_claim(pki, factory, tmp_path, unique_id("batch"))
    context_client = est_client(pki, registry.url, (claim.cert, claim.key))
    with context_client as est:
        response = est.get(f"{registry.url}/api/v1/devices")
    assert response.status_code == 403, response.text


def test_a_one_time_secret_enrolls_its_device_once(
    pki: TestPKI, registry: RegistryServer, tmp_path: Path
) -> None:
    device_id = unique_id()
    with Session(registry.state.engine) as session:
        secret = claim_store.create_secret(session, device_id, DAY, Actor("test"))
    with est_client(pki, registry.url, auth=(device_id, secret)) as est:
        other = enroll(est, csr_der(device_id=unique_id("other"))[0])
        (certificate,) = parse_certs_only(enroll(est, csr_der(device_id=device_id)[0]))
        again = enroll(est, csr_der(device_id=device_id)[0])
    with est_client(pki, registry.url, auth=(device_id, "cfe_wrong")) as est:
        wrong = enroll(est, csr_der(device_id=device_id)[0])
    _refused(other, 403, "bound to device")
    assert read_identity(certificate).name == device_id
    _refused(again, 403, "was used")
    _refused(wrong, 403, "no enrollment secret")
    with Session(registry.state.engine) as session:
        entry = session.exec(
            select(AuditLog).where(AuditLog.target == device_id, AuditLog.action == "enroll")
        ).one()
    assert entry.detail is not None and entry.detail["credential"] == "enrollment_secret"


def test_bodies_that_are_not_base64_der_are_refused_naming_what_was_sent(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    claim = make_claim(pki, factory, tmp_path, unique_id("batch"))
    der, _ = csr_der(device_id=unique_id())
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der) + b"-----END"
    headers = {"Content-Type": "application/pkcs10"}
    with _claim_client(pki, registry, claim) as est:
        _refused(est.post("/simpleenroll", content=pem, headers=headers), 400, "PEM")
        _refused(est.post("/simpleenroll", content=der, headers=headers), 400, "binary")
        _refused(est.post("/simpleenroll", content=b"A" * 30_000, headers=headers), 413, "exceeds")
        _refused(
            est.post("/simpleenroll", content=base64.encodebytes(der)),
            400,
            "application/pkcs10",
        )


def test_a_weak_key_and_a_bad_signature_are_refused(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    claim = make_claim(pki, factory, tmp_path, unique_id("batch"))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_der, _ = csr_der(weak, device_id=unique_id())
    good_der, _ = csr_der(device_id=unique_id())
    tampered = bytearray(good_der)
    tampered[-5] ^= 0x01  # inside the signature
    with _claim_client(pki, registry, claim) as est:
        _refused(enroll(est, weak_der), 400, "too weak")
        _refused(enroll(est, bytes(tampered)), 400, "signature")


def test_a_device_reenrolls_with_its_certificate_under_the_renewal_rules(
    pki: TestPKI,
    registry: RegistryServer,
    factory: httpx.Client,
    operator: httpx.Client,
    tmp_path: Path,
) -> None:
    claim = make_claim(pki, factory, tmp_path, unique_id("batch"))
    device_id = unique_id()
    cert_path, key_path = _enroll_device(pki, registry, claim, device_id, tmp_path)
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    with est_client(pki, registry.url, (cert_path, key_path)) as est:
        foreign = enroll(est, csr_der(device_id="dev-someone-else")[0], "/simplereenroll")
        der, key = csr_der(device_id=device_id)
        (renewed,) = parse_certs_only(enroll(est, der, "/simplereenroll"))
        same = parse_certs_only(enroll(est, der, "/simplereenroll"))  # a lost answer
        too_soon = enroll(est, csr_der(device_id=device_id)[0], "/simplereenroll")
    _refused(foreign, 403, "re-enrolls only itself")
    assert read_identity(renewed).name == device_id
    assert renewed.public_key() == key.public_key()
    assert same == [renewed]
    # the stagger kept: the same lifetime as the certificate it replaces
    assert renewed.not_valid_after_utc - renewed.not_valid_before_utc == (
        old.not_valid_after_utc - old.not_valid_before_utc
    )
    _refused(too_soon, 429, "renewed")
    assert int(too_soon.headers["retry-after"]) > 0
    body = operator.get(f"/devices/{device_id}").json()
    assert {c["serial"]: c["status"] for c in body["certificates"]} == {
        serial_hex(old.serial_number): "live",  # until the new one is confirmed in use
        serial_hex(renewed.serial_number): "live",
    }
    trail = operator.get(f"/devices/{device_id}/audit").json()
    assert [e["action"] for e in trail["entries"]][:2] == ["renew", "enroll"]


def test_a_decommissioned_device_cannot_reenroll(
    pki: TestPKI,
    registry: RegistryServer,
    factory: httpx.Client,
    operator: httpx.Client,
    tmp_path: Path,
) -> None:
    claim = make_claim(pki, factory, tmp_path, unique_id("batch"))
    device_id = unique_id()
    files = _enroll_device(pki, registry, claim, device_id, tmp_path)
    response = operator.post(f"/devices/{device_id}/decommission", json={"reason": "stolen"})
    assert response.status_code == 200, response.text
    with est_client(pki, registry.url, files) as est:
        refused = enroll(est, csr_der(device_id=device_id)[0], "/simplereenroll")
    _refused(refused, 409, "decommissioned")
    with _claim_client(pki, registry, claim) as est:  # nor come back through the claim
        _refused(enroll(est, csr_der(device_id=device_id)[0]), 409, "decommissioned")


def test_enrollment_secret_create_prints_it_once_and_stores_only_its_hash(
    pki: TestPKI, registry: RegistryServer, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from registry.cli import app as registry_app
    from registry.est.models import EnrollmentSecret

    device_id = unique_id()
    url = registry.settings.registry_database_url or ""
    args = ["enrollment-secret", "create", "--device", device_id, "--database-url", url]
    result = CliRunner().invoke(registry_app, [*args, "--data-dir", str(pki.layout.root)])
    assert result.exit_code == 0, (result.output, result.exception)
    secret = result.output.strip()
    assert secret.startswith("cfe_")
    with Session(registry.state.engine) as session:
        row = session.exec(
            select(EnrollmentSecret).where(EnrollmentSecret.device_id == device_id)
        ).one()
    assert secret not in row.secret_sha256
    with est_client(pki, registry.url, auth=(device_id, secret)) as est:
        (certificate,) = parse_certs_only(enroll(est, csr_der()[0]))  # the CSR names nobody
    assert read_identity(certificate).name == device_id
    taken = CliRunner().invoke(registry_app, [*args, "--data-dir", str(pki.layout.root)])
    assert taken.exit_code != 0 and "registered already" in str(taken.exception)
