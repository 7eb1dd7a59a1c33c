"""Re-enrollment of a device whose certificates have all expired: `POST
/devices/{id}/reenroll` and `certfleet registry devices reenroll`, against a real HTTPS
registry on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory.ca import IssuedCertificate
from fleetcore.keys import build_csr, generate_key
from fleetcore.profile import Identity, IdentityKind, PrivateKey, read_identity, serial_hex
from registry.server import RegistryServer
from tests.registry.test_operator_cli import operator_files, run
from tests.support.pki import TRUST_DOMAIN, TestPKI, pem, unique_id
from tests.support.registry_fixtures import Clients

DAY = dt.timedelta(days=1)


def _csr(device_id: str) -> tuple[str, PrivateKey]:
    key = generate_key()
    csr = build_csr(key, Identity.device(TRUST_DOMAIN, device_id))
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def _expired_device(
    operator: httpx.Client, mint: Callable[..., IssuedCertificate], device_id: str
) -> IssuedCertificate:
    """A registered device whose only certificate lived 30 days and expired yesterday."""
    now = dt.datetime.now(dt.UTC)
    issued = mint(device_id, not_before=now - 31 * DAY, not_after=now - DAY)
    response = operator.post("/devices", json={"certificate_pem": pem(issued)})
    assert response.status_code == 201, response.text
    return issued


def _certificates(operator: httpx.Client, device_id: str) -> list[dict[str, object]]:
    response = operator.get(f"/devices/{device_id}")
    assert response.status_code == 200, response.text
    certificates: list[dict[str, object]] = response.json()["certificates"]
    return certificates


def _refusal(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["error"] == code, detail
    message: str = detail["message"]
    return message


def test_an_expired_device_is_reenrolled_and_its_new_certificate_is_its_identity(
    pki: TestPKI,
    registry: RegistryServer,
    clients: Clients,
    operator: httpx.Client,
    mint: Callable[..., IssuedCertificate],
    tmp_path: Path,
) -> None:
    device_id = unique_id()
    old = _expired_device(operator, mint, device_id)
    csr_pem, key = _csr(device_id)
    response = operator.post(f"/devices/{device_id}/reenroll", json={"csr_pem": csr_pem})
    assert response.status_code == 201, response.text
    body = response.json()
    old_serial = serial_hex(old.certificate.serial_number)
    assert body["previous_serial"] == old_serial
    assert body["repeated"] is False
    certificate = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    assert read_identity(certificate).name == device_id
    assert certificate.public_key() == key.public_key()
    certificate.verify_directly_issued_by(pki.ca.issuing_cert)
    chain = x509.load_pem_x509_certificates(body["chain_pem"].encode())
    assert chain == [pki.ca.issuing_cert, pki.ca.root_cert]
    now = dt.datetime.now(dt.UTC)
    assert certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc
    # The lifetime is copied from the expired certificate (30 days), as a renewal's is.
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert 30 * DAY <= lifetime <= 31 * DAY
    assert [c["serial"] for c in _certificates(operator, device_id)] == [old_serial, body["serial"]]
    entries = operator.get(f"/devices/{device_id}/audit").json()["entries"]
    assert entries[0]["action"] == "reenroll"
    assert entries[0]["who"].endswith("/operator/alice")
    assert entries[0]["detail"]["serial"] == body["serial"]
    metrics = operator.get("/metrics").text
    assert "certfleet_registry_reenrollments_total 1.0" in metrics

    # The new pair authenticates in a real TLS handshake: the registry reads the device
    # identity from it and refuses it as an operator (403, not 401).
    cert_file, key_file = tmp_path / "device.crt", tmp_path / "device.key"
    cert_file.write_text(body["certificate_pem"] + body["chain_pem"])
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(cert_file), str(key_file))
    with httpx.Client(base_url=f"{registry.url}/api/v1", verify=context) as device:
        assert device.get("/devices").status_code == 403


def test_the_same_csr_again_gets_the_same_certificate(
    operator: httpx.Client, mint: Callable[..., IssuedCertificate]
) -> None:
    device_id = unique_id()
    _expired_device(operator, mint, device_id)
    csr_pem, key = _csr(device_id)
    first = operator.post(f"/devices/{device_id}/reenroll", json={"csr_pem": csr_pem})
    assert first.status_code == 201, first.text
    # The answer was lost on the way: the operator asks again with the same CSR.
    again = operator.post(f"/devices/{device_id}/reenroll", json={"csr_pem": csr_pem})
    assert again.status_code == 200, again.text
    assert again.json()["repeated"] is True
    assert again.json()["certificate_pem"] == first.json()["certificate_pem"]
    # Another key for the same device now is a device with a valid certificate.
    other, _ = _csr(device_id)
    message = _refusal(
        operator.post(f"/devices/{device_id}/reenroll", json={"csr_pem": other}),
        409,
        "live_certificate",
    )
    assert f"serial {first.json()['serial']}" in message
    assert len(_certificates(operator, device_id)) == 2


def test_a_device_with_a_valid_certificate_renews_itself_and_is_refused(
    operator: httpx.Client, mint: Callable[..., IssuedCertificate]
) -> None:
    device_id = unique_id()
    issued = mint(device_id)
    assert operator.post("/devices", json={"certificate_pem": pem(issued)}).status_code == 201
    csr_pem, _ = _csr(device_id)
    message = _refusal(
        operator.post(f"/devices/{device_id}/reenroll", json={"csr_pem": csr_pem}),
        409,
        "live_certificate",
    )
    assert "renews itself over MQTT" in message
    assert len(_certificates(operator, device_id)) == 1
    entries = operator.get(f"/devices/{device_id}/audit").json()["entries"]
    assert [e["action"] for e in entries] == ["register"]


def test_what_cannot_be_reenrolled_is_refused_with_a_reason_and_nothing_is_written(
    pki: TestPKI,
    clients: Clients,
    operator: httpx.Client,
    mint: Callable[..., IssuedCertificate],
) -> None:
    gone = unique_id()
    _expired_device(operator, mint, gone)
    decommissioned = operator.post(f"/devices/{gone}/decommission", json={"reason": "scrapped"})
    assert decommissioned.status_code == 200, decommissioned.text
    csr_pem, _ = _csr(gone)
    _refusal(
        operator.post(f"/devices/{gone}/reenroll", json={"csr_pem": csr_pem}),
        409,
        "device_decommissioned",
    )
    unknown = unique_id()
    message = _refusal(
        operator.post(f"/devices/{unknown}/reenroll", json={"csr_pem": _csr(unknown)[0]}),
        404,
        "not_found",
    )
    assert "not re-enrolled" in message

    device_id = unique_id()
    _expired_device(operator, mint, device_id)
    path = f"/devices/{device_id}/reenroll"
    message = _refusal(
        operator.post(path, json={"csr_pem": _csr(unique_id())[0]}), 422, "invalid_csr"
    )
    assert "must come from the device being re-enrolled" in message
    _refusal(operator.post(path, json={"csr_pem": "not a CSR"}), 422, "invalid_csr")
    service_key = generate_key()
    service_csr = build_csr(service_key, Identity(TRUST_DOMAIN, IdentityKind.SERVICE, device_id))
    _refusal(
        operator.post(
            path,
            json={"csr_pem": service_csr.public_bytes(serialization.Encoding.PEM).decode()},
        ),
        422,
        "invalid_csr",
    )
    assert operator.post(path, json={"csr_pem": "x" * 20_000}).status_code == 422
    assert operator.post(path, json={"csr": _csr(device_id)[0]}).status_code == 422
    # Only operators: a device (even this one) is 403, no identity 401.
    device_client = clients.of(IdentityKind.DEVICE, device_id)
    assert device_client.post(path, json={"csr_pem": _csr(device_id)[0]}).status_code == 403
    assert clients.make().post(path, json={"csr_pem": _csr(device_id)[0]}).status_code == 401
    assert len(_certificates(operator, device_id)) == 1


def test_concurrent_reenrollments_of_one_device_issue_one_certificate(
    operator: httpx.Client, mint: Callable[..., IssuedCertificate]
) -> None:
    device_id = unique_id()
    _expired_device(operator, mint, device_id)
    csrs = [_csr(device_id)[0] for _ in range(6)]
    statuses: list[int] = []
    start = threading.Barrier(len(csrs))

    def reenroll(csr_pem: str) -> None:
        start.wait(10)
        response = operator.post(f"/devices/{device_id}/reenroll", json={"csr_pem": csr_pem})
        statuses.append(response.status_code)

    threads = [threading.Thread(target=reenroll, args=(csr,)) for csr in csrs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [201] + [409] * (len(csrs) - 1), statuses
    assert len(_certificates(operator, device_id)) == 2


def test_cli_writes_the_certificate_and_chain_and_refuses_in_one_line(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    mint: Callable[..., IssuedCertificate],
    tmp_path: Path,
) -> None:
    operator_files(pki, "alice")
    device_id = unique_id()
    _expired_device(operator, mint, device_id)
    csr_file = tmp_path / "device.csr"
    csr_pem, key = _csr(device_id)
    # DER on disk works too: the CLI reads either.
    csr_file.write_bytes(
        x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    )
    out, chain = tmp_path / "device.crt", tmp_path / "chain.pem"
    args = ["reenroll", device_id, "--csr", str(csr_file), "--operator", "alice"]
    missing_folder = tmp_path / "nowhere" / "device.crt"
    refused = run(pki, registry, *args, "--out", str(missing_folder))
    assert refused.exit_code != 0
    assert "nothing was asked of the registry" in str(refused.exception)
    folder = run(pki, registry, *args, "--chain-out", str(tmp_path))
    assert folder.exit_code != 0
    assert "it is a folder" in str(folder.exception)
    assert len(_certificates(operator, device_id)) == 1

    done = run(pki, registry, *args, "--out", str(out), "--chain-out", str(chain))
    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"reenrolled {device_id}: {out} serial ")
    certificate = x509.load_pem_x509_certificate(out.read_bytes())
    assert certificate.public_key() == key.public_key()
    assert out.stat().st_mode & 0o777 == 0o644
    assert x509.load_pem_x509_certificates(chain.read_bytes())[0] == pki.ca.issuing_cert

    again = run(pki, registry, *args, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["repeated"] is True

    other = tmp_path / "other.csr"
    other.write_text(_csr(device_id)[0])
    args[3] = str(other)
    refused = run(pki, registry, *args)
    assert refused.exit_code != 0
    assert "HTTP 409" in str(refused.exception) and "renews itself" in str(refused.exception)
    bad = tmp_path / "bad.csr"
    bad.write_text("not a CSR")
    args[3] = str(bad)
    assert run(pki, registry, *args).exit_code != 0
