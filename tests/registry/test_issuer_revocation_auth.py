"""After ``certfleet ca revoke-issuing`` (issue 26) the registry refuses every client
certificate of the revoked issuing CA, whoever it names (operators and services over REST,
the console's certificate sign-in, whose open sessions end), while the new issuing CA's are
accepted; OCSP answers ``revoked`` (cACompromise) for its serials while the registry still
holds the CA, ``unknown`` once the CA folder dropped it."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from factory.ca import CertificateAuthority, write_issued
from factory.issuers import apply_revocation, issuer_key_id, prepare_revocation
from factory.keys import load_private_key
from fleetcore.profile import IdentityKind, OperatorRole
from registry.issuer_revocations import IssuerRevocations
from tests.console.conftest import csrf_of
from tests.registry.publishing import Published, publishing_registry
from tests.support.waits import wait_for

OPENSSL = shutil.which("openssl")


def _credentials(
    published: Published, kind: IdentityKind, name: str, role: OperatorRole | None = None
) -> tuple[Path, Path]:
    ca, layout = published.ca, published.layout
    issued = ca.issue_client(ca.identity(kind, name), role=role)
    cert, key = layout.client_cert(name), layout.client_key(name)
    write_issued(issued, cert, key)
    return cert, key


def _client(published: Published, files: tuple[Path, Path], base: str = "/api/v1") -> httpx.Client:
    context = ssl.create_default_context(cafile=str(published.layout.root_cert))
    context.load_cert_chain(str(files[0]), str(files[1]))
    return httpx.Client(base_url=f"{published.registry.url}{base}", verify=context, timeout=30)


def _registry_ca(published: Published) -> CertificateAuthority:
    ca = published.registry.state.ca
    assert isinstance(ca, CertificateAuthority)
    return ca


def _ocsp_status(published: Published, cert: Path, issuer: x509.Certificate) -> ocsp.OCSPResponse:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256()).build()
    answer = httpx.post(
        f"{published.publish_url}/ocsp",
        content=request.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=10,
    )
    assert answer.status_code == 200
    return ocsp.load_der_ocsp_response(answer.content)


def test_certificates_of_a_revoked_issuing_ca_are_refused_at_the_registry(
    tmp_path: Path,
) -> None:
    if OPENSSL is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    with publishing_registry(tmp_path) as published:
        layout = published.layout
        old_operator = _credentials(published, IdentityKind.OPERATOR, "olga", OperatorRole.ADMIN)
        old_service = _credentials(published, IdentityKind.SERVICE, "factory")
        old_id = issuer_key_id(published.ca.issuing_cert)
        old_issuing = published.ca.issuing_cert
        new_id = published.ca.rollover().key_id
        assert wait_for(lambda: _registry_ca(published).issuer_by_key_id(new_id) is not None, 5)
        new_operator = _credentials(published, IdentityKind.OPERATOR, "nina", OperatorRole.ADMIN)
        new_service = _credentials(published, IdentityKind.SERVICE, "factory-2")

        with (
            _client(published, old_operator) as old,
            _client(published, old_service) as old_svc,
            _client(published, new_operator) as new,
            _client(published, new_service) as new_svc,
            _client(published, old_operator, base="") as console,
        ):
            # During the overlap both issuing CAs' certificates are accepted.
            assert old.get("/devices").status_code == 200
            assert old_svc.get("/revocations").status_code == 200
            form = console.get("/ui/sign-in")
            signed_in = console.post(
                "/ui/sign-in/certificate", data={"csrf_token": csrf_of(form.text), "next": ""}
            )
            assert signed_in.status_code == 303, signed_in.text
            assert console.get("/ui/").status_code == 200

            root_key = load_private_key(layout.root_key)
            cert_path, issuing, arl = prepare_revocation(layout, old_id[:12], root_key)
            body = {
                "issuer_pem": issuing.public_bytes(serialization.Encoding.PEM).decode(),
                "arl_pem": arl.public_bytes(serialization.Encoding.PEM).decode(),
            }
            revoked = new.post("/issuers/revoke", json=body)
            assert revoked.status_code == 200, revoked.text

            # Refused from the next request on, with what to do.
            for client in (old, old_svc):
                refused = client.get("/revocations")
                assert refused.status_code == 401, refused.text
                message = refused.json()["detail"]["message"]
                assert f"issuing CA {old_id[:16]} was revoked by the root" in message, message
                assert "certfleet ca issue-client" in message
            assert new.get("/devices").status_code == 200
            assert new_svc.get("/revocations").status_code == 200
            metric = published.registry.state.metrics.registry.get_sample_value(
                "certfleet_registry_auth_refusals_total", {"reason": "revoked_issuer"}
            )
            assert metric == 2
            # A registry node that never saw the request learns it from the database.
            other_node = IssuerRevocations(published.registry.state.engine)
            assert other_node.revoked_at(old_id) is not None
            assert other_node.revoked_at(new_id) is None

            # The console: the session opened with the certificate is over, and the
            # certificate cannot open another.
            assert console.get("/ui/").status_code == 303
            form = console.get("/ui/sign-in")
            assert f"issuing CA {old_id[:16]} was revoked by the root" in form.text
            again = console.post(
                "/ui/sign-in/certificate", data={"csrf_token": csrf_of(form.text), "next": ""}
            )
            assert again.status_code == 401, again.text

            # OCSP while the registry still holds the revoked CA: revoked, cACompromise,
            # for the operator's certificate too (the registry never registered it), signed
            # by that CA (openssl verifies it against the root).
            old_file = tmp_path / "old-issuing.crt"
            old_file.write_bytes(old_issuing.public_bytes(serialization.Encoding.PEM))
            result = subprocess.run(
                [
                    OPENSSL,
                    "ocsp",
                    "-issuer",
                    str(old_file),
                    "-cert",
                    str(old_operator[0]),
                    "-url",
                    f"{published.publish_url}/ocsp",
                    "-CAfile",
                    str(layout.root_cert),
                    "-timeout",
                    "10",
                ],  # fmt: skip
                capture_output=True,
                text=True,
                timeout=30,
            )
            output = result.stdout + result.stderr
            assert "Response verify OK" in output, output
            assert f"{old_operator[0]}: revoked" in output, output
            assert "Reason: cACompromise" in output, output

            # Once the CA folder drops it (what the command does next) it is none of ours.
            apply_revocation(layout, cert_path, arl)
            assert wait_for(lambda: _registry_ca(published).issuer_by_key_id(old_id) is None, 5)
            answer = _ocsp_status(published, old_operator[0], old_issuing)
            assert answer.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
            assert old.get("/devices").status_code == 401  # still refused
