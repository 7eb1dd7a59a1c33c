"""EST with real clients on a real registry: strongSwan's ``pki --estca`` / ``pki --est``
(Debian ``strongswan-pki`` with ``libstrongswan-extra-plugins``) and curl plus openssl as
RFC 7030's examples do. The exact commands are those of docs/interop.md."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from sqlmodel import Session

from fleetcore.profile import IdentityKind, read_identity, serial_hex
from registry.server import RegistryServer
from registry.store import claims as claim_store
from registry.store.audit import Actor
from tests.conftest import TestPKI
from tests.registry.conftest import Clients, unique_id
from tests.registry.est_client import make_claim

TIMEOUT = 60


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian package {package})")
    return path


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd
    )


def _pki(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run(_need("pki", "strongswan-pki, libstrongswan-extra-plugins"), *args, cwd=cwd)


def _pki_request(cwd: Path, name: str, dn: str) -> tuple[Path, Path]:
    """A key and a PKCS#10 request made by strongSwan (CN only: pki writes no URI SANs)."""
    pki = _need("pki", "strongswan-pki, libstrongswan-extra-plugins")
    key, csr = cwd / f"{name}.key", cwd / f"{name}.csr"
    with key.open("wb") as out:
        subprocess.run(
            [pki, "--gen", "--type", "ecdsa", "--size", "256"],
            stdout=out, check=True, timeout=TIMEOUT,
        )  # fmt: skip
    with csr.open("wb") as out:
        subprocess.run(
            [pki, "--req", "--in", str(key), "--type", "ecdsa", "--dn", dn],
            stdout=out, check=True, timeout=TIMEOUT,
        )  # fmt: skip
    return key, csr


@pytest.fixture
def factory(clients: Clients) -> httpx.Client:
    return clients.of(IdentityKind.SERVICE, "factory")


def test_strongswan_fetches_cacerts(pki: TestPKI, registry: RegistryServer, tmp_path: Path) -> None:
    fetched = _pki(
        "--estca", "--url", registry.url, "--cacert", pki.layout.root_cert,
        "--outform", "pem", cwd=tmp_path,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    pems = x509.load_pem_x509_certificates(fetched.stdout.encode())
    assert set(pems) == {pki.ca.issuing_cert, pki.ca.root_cert}


def test_strongswan_enrolls_with_a_secret_then_reenrolls_with_its_certificate(
    pki: TestPKI, registry: RegistryServer, tmp_path: Path
) -> None:
    device_id = unique_id()
    with Session(registry.state.engine) as session:
        secret = claim_store.create_secret(session, device_id, dt.timedelta(days=1), Actor("test"))
    key, csr = _pki_request(tmp_path, "first", f"CN={device_id}")
    trust = ["--cacert", pki.layout.issuing_cert, "--cacert", pki.layout.root_cert]
    enrolled = _pki(
        "--est", "--url", registry.url, *trust, "--in", csr,
        "--userpass", f"{device_id}:{secret}", "--outform", "pem", cwd=tmp_path,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    first = x509.load_pem_x509_certificate(enrolled.stdout.encode())
    assert read_identity(first).name == device_id
    cert = tmp_path / "first.crt"
    cert.write_text(enrolled.stdout)

    _new_key, new_csr = _pki_request(tmp_path, "second", f"CN={device_id}")
    renewed = _pki(
        "--est", "--url", registry.url, *trust, "--in", new_csr,
        "--cert", cert, "--key", key, "--outform", "pem", cwd=tmp_path,
    )  # fmt: skip
    assert renewed.returncode == 0, renewed.stderr
    second = x509.load_pem_x509_certificate(renewed.stdout.encode())
    assert read_identity(second).name == device_id
    assert second.serial_number != first.serial_number

    again = _pki(
        "--est", "--url", registry.url, *trust, "--in", new_csr,
        "--userpass", f"{device_id}:{secret}", "--outform", "pem", cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode != 0  # the secret is spent
    assert "HTTP 403" in again.stderr


def test_curl_and_openssl_enroll_with_a_claim_and_reenroll_as_rfc_7030_shows(
    pki: TestPKI, registry: RegistryServer, factory: httpx.Client, tmp_path: Path
) -> None:
    curl = _need("curl", "curl")
    openssl = _need("openssl", "openssl")
    device_id = unique_id()
    claim = make_claim(pki, factory, tmp_path, unique_id("batch"), quota=1)
    est = f"{registry.url}/.well-known/est"
    root = str(pki.layout.root_cert)

    cacerts = _run(curl, "-sS", "--fail", "--cacert", root, f"{est}/cacerts", cwd=tmp_path)
    assert cacerts.returncode == 0, cacerts.stderr
    printed = subprocess.run(
        [openssl, "pkcs7", "-inform", "DER", "-print_certs"],
        input=base64.b64decode(cacerts.stdout),
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    assert set(x509.load_pem_x509_certificates(printed)) == {
        pki.ca.issuing_cert,
        pki.ca.root_cert,
    }

    def request(name: str, subject: str, key_args: list[str]) -> Path:
        """``openssl req`` DER, base64-encoded into ``<name>.b64`` (RFC 7030's body)."""
        made = subprocess.run(
            [openssl, "req", "-new", *key_args, "-subj", subject, "-outform", "DER"],
            capture_output=True, timeout=TIMEOUT, check=True, cwd=tmp_path,
        ).stdout  # fmt: skip
        body = tmp_path / f"{name}.b64"
        body.write_bytes(base64.b64encode(made))
        return body

    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    first_body = request("first", f"/CN={device_id}", [*new_key, "-keyout", "device.key"])
    headers = ["-H", "Content-Type: application/pkcs10"]
    enrolled = _run(
        curl, "-sS", "--fail-with-body", "--cacert", root,
        "--cert", claim.cert, "--key", claim.key, *headers,
        "--data-binary", f"@{first_body}", f"{est}/simpleenroll", cwd=tmp_path,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    device_pem = subprocess.run(
        [openssl, "pkcs7", "-inform", "DER", "-print_certs"],
        input=base64.b64decode(enrolled.stdout),
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    (tmp_path / "device.crt").write_bytes(device_pem)
    device = x509.load_pem_x509_certificate(device_pem)
    assert read_identity(device).name == device_id

    over_quota = _run(
        curl, "-sS", "--fail-with-body", "--cacert", root,
        "--cert", claim.cert, "--key", claim.key, *headers,
        "--data-binary", f"@{request('other', '/CN=dev-other', new_key)}",
        f"{est}/simpleenroll", cwd=tmp_path,
    )  # fmt: skip
    assert over_quota.returncode != 0 and "quota of 1" in over_quota.stdout

    again_body = request("again", f"/CN={device_id}", ["-key", "device.key"])
    renewed = _run(
        curl, "-sS", "--fail-with-body", "--cacert", root,
        "--cert", "device.crt", "--key", "device.key", *headers,
        "--data-binary", f"@{again_body}", f"{est}/simplereenroll", cwd=tmp_path,
    )  # fmt: skip
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert serial_hex(device.serial_number) not in renewed.stdout
