"""`certfleet certificate inspect`: what the profile reads out, and revocation asked of the
registry (its OCSP responder from the certificate's AIA, or its REST API with operator
credentials). Here beside the registry fixtures it needs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session
from typer.testing import CliRunner

from certfleet.certificate_cli import certificate_app
from factory.ca import write_issued
from factory.ocsp_client import OcspCheckError, ask_ocsp
from fleetcore.errors import IdentityError
from fleetcore.profile import IdentityKind, serial_hex
from registry.server import RegistryServer
from registry.store import audit, tokens
from tests.registry.publishing import Published
from tests.support.pki import TestPKI, pem, unique_id


def inspect(*args: str) -> Result:
    return CliRunner().invoke(
        certificate_app,
        ["inspect", *args],
        env={"CERTFLEET_REGISTRY_TOKEN": "", "CERTFLEET_REGISTRY_OPERATOR": ""},
    )


def report(*args: str) -> dict[str, object]:
    result = inspect(*args, "--json")
    assert result.exit_code == 0, result.output
    parsed: dict[str, object] = json.loads(result.output)
    return parsed


def test_inspect_reads_a_device_certificate_pem_and_der(pki: TestPKI, tmp_path: Path) -> None:
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, "dev-inspect"))
    pem_file, der_file = tmp_path / "dev.crt", tmp_path / "dev.der"
    pem_file.write_bytes(issued.certificate_pem + pki.ca.chain_pem)  # leaf first, then chain
    der_file.write_bytes(issued.certificate.public_bytes(serialization.Encoding.DER))
    for path in (pem_file, der_file):
        seen = report(str(path), "--offline")
        assert seen["kind"] == "device"
        assert seen["identity"] == "spiffe://fleet.test/device/dev-inspect"
        assert seen["name"] == "dev-inspect" and seen["trust_domain"] == "fleet.test"
        assert seen["serial"] == serial_hex(issued.certificate.serial_number)
        assert seen["validity"] == "valid"
        assert seen["not_after"] == issued.certificate.not_valid_after_utc.isoformat()
        assert seen["revocation"] == {
            "status": "not checked",
            "source": None,
            "detail": "--offline",
        }
    table = inspect(str(pem_file), "--offline")
    assert "spiffe://fleet.test/device/dev-inspect" in table.output
    assert serial_hex(issued.certificate.serial_number) in table.output


def test_inspect_says_why_a_certificate_is_not_an_identity(pki: TestPKI, tmp_path: Path) -> None:
    server = pki.ca.issue_server("inspect-srv", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    server_file = tmp_path / "server.crt"
    server_file.write_bytes(server.certificate_pem)
    seen = report(str(server_file), "--offline")
    assert seen["kind"] == "server" and seen["identity"] is None
    assert "clientAuth" in str(seen["not_an_identity_because"])
    assert seen["dns_names"] == ["localhost"] and seen["ip_addresses"] == ["127.0.0.1"]
    root = report(str(pki.layout.root_cert), "--offline")
    assert root["kind"] == "ca"


def test_inspect_refuses_a_file_without_a_certificate(tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"not a certificate")
    result = inspect(str(junk))
    assert isinstance(result.exception, IdentityError)
    assert "no readable PEM or DER certificate" in str(result.exception)
    missing = inspect(str(tmp_path / "absent.crt"))
    assert isinstance(missing.exception, IdentityError)
    assert "cannot read" in str(missing.exception)


def test_inspect_asks_the_ocsp_responder_the_certificate_names(published: Published) -> None:
    cert, _ = published.device("dev-inspect-ocsp")
    data = ["--data-dir", str(published.layout.root)]
    before = report(str(cert), *data)["revocation"]
    assert before == {
        "status": "good",
        "source": f"ocsp {published.publish_url}/ocsp",
        "revoked_at": None,
        "reason": None,
    }
    published.decommission("dev-inspect-ocsp", reason_code="superseded")
    after = report(str(cert), *data)["revocation"]
    assert isinstance(after, dict)
    assert after["status"] == "revoked" and after["revoked_at"]
    assert after["reason"] == "superseded"
    unregistered, _ = published.device("dev-inspect-new", register=False)
    assert report(str(unregistered), *data)["revocation"]["status"] == "unknown"  # type: ignore[index]


def test_inspect_reports_an_unreachable_responder_without_failing(
    published: Published, tmp_path: Path
) -> None:
    cert, _ = published.device("dev-inspect-down")
    seen = report(
        str(cert), "--data-dir", str(published.layout.root), "--ocsp-url", "http://127.0.0.1:9/ocsp"
    )
    revocation = seen["revocation"]
    assert isinstance(revocation, dict) and revocation["status"] == "not checked"
    assert "unreachable" in revocation["detail"]


def test_inspect_asks_the_registry_api_with_operator_credentials(
    pki: TestPKI, registry: RegistryServer, operator: httpx.Client, tmp_path: Path
) -> None:
    device_id = unique_id()
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, device_id))
    assert operator.post("/devices", json={"certificate_pem": pem(issued)}).status_code == 201
    cert = tmp_path / "dev.crt"
    write_issued(issued, cert, tmp_path / "dev.key")
    with Session(registry.state.engine) as session:
        token = tokens.create_token(session, "dana", audit.Actor(who="test"))
    args = [str(cert), "--registry", registry.url, "--data-dir", str(pki.layout.root)]
    assert report(*args)["revocation"]["status"] == "not checked"  # type: ignore[index]
    assert report(*args, "--token", token)["revocation"]["status"] == "good"  # type: ignore[index]
    operator.post(f"/devices/{device_id}/decommission", json={"reason": "r"})
    after = report(*args, "--token", token)["revocation"]
    assert isinstance(after, dict) and after["status"] == "revoked" and after["revoked_at"]


# -- the OCSP client refuses answers it must not believe -----------------------------------------


@pytest.fixture
def replaying(published: Published) -> Iterator[tuple[str, list[bytes]]]:
    """A responder that answers every request with a stored answer (a replay)."""
    stored: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "application/ocsp-response")
            self.end_headers()
            self.wfile.write(stored[0])

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/ocsp", stored
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_replayed_ocsp_answer_is_not_believed(
    published: Published, replaying: tuple[str, list[bytes]]
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509 import ocsp

    url, stored = replaying
    cert_path, _ = published.device("dev-replay")
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, published.ca.issuing_cert, hashes.SHA256())
        .add_extension(x509.OCSPNonce(b"an old nonce 123"), critical=False)
        .build()
    )
    old = httpx.post(
        f"{published.publish_url}/ocsp",
        content=request.public_bytes(serialization.Encoding.DER),
        timeout=10,
    )
    stored.append(old.content)
    assert ask_ocsp(certificate, published.ca.issuing_cert, f"{published.publish_url}/ocsp")
    with pytest.raises(OcspCheckError, match="does not echo our nonce"):
        ask_ocsp(certificate, published.ca.issuing_cert, url)


def test_an_answer_not_signed_for_the_issuer_is_not_believed(
    published: Published, tmp_path: Path
) -> None:
    from cryptography import x509

    from factory.ca import CertificateAuthority
    from fleetcore.layout import DataLayout

    cert_path, _ = published.device("dev-forged")
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    # Asked about another issuer, our responder answers (unknown) with its own signature,
    # which that issuer never delegated: the answer must be refused, not read.
    other = CertificateAuthority.init(DataLayout(tmp_path / "other"), "fleet.pub")
    with pytest.raises(OcspCheckError, match="signature does not verify"):
        ask_ocsp(certificate, other.issuing_cert, f"{published.publish_url}/ocsp")


def test_inspect_without_the_issuing_ca_says_so(published: Published, tmp_path: Path) -> None:
    cert, _ = published.device("dev-no-issuer")
    revocation = report(str(cert), "--data-dir", str(tmp_path / "empty"))["revocation"]
    assert isinstance(revocation, dict) and revocation["status"] == "not checked"
    assert "pass --issuer" in revocation["detail"]
