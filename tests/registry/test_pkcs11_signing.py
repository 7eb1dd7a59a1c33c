"""The registry signs with the CA's PKCS#11 token (SoftHSM2): a renewal, the CRL and OCSP
answers, each checked by openssl against the root; no key file is written."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory.ca import CertificateAuthority, TokenInit, write_issued
from factory.signer import TokenKey
from fleetcore.keys import build_csr, generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import Identity, IdentityKind
from registry.ocsp import RESPONDER_NAME
from registry.renewal import CertificateRenewer
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.registry.publishing import free_port
from tests.softhsm import SoftHsm

TRUST_DOMAIN = "fleet.hsm"


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    return found


class TokenRegistry:
    def __init__(self, layout: DataLayout, registry: RegistryServer, operator: httpx.Client):
        self.layout = layout
        self.registry = registry
        self.operator = operator
        self.publish_url = registry.publication.url if registry.publication else ""

    def device(self, ca: CertificateAuthority, device_id: str) -> Path:
        issued = ca.issue_client(ca.identity(IdentityKind.DEVICE, device_id))
        cert = self.layout.root / f"{device_id}.crt"
        write_issued(issued, cert, self.layout.root / f"{device_id}.key")
        response = self.operator.post(
            "/devices", json={"certificate_pem": issued.certificate_pem.decode()}
        )
        assert response.status_code == 201, response.text
        return cert


@pytest.fixture
def token_registry(softhsm: SoftHsm, tmp_path: Path) -> Iterator[TokenRegistry]:
    port = free_port()
    layout = DataLayout(tmp_path / "data")
    ca = CertificateAuthority.init(
        layout,
        TRUST_DOMAIN,
        publish_url=f"http://127.0.0.1:{port}",
        token=TokenInit(
            softhsm.module, softhsm.label, softhsm.pin_file.read_bytes().strip(), softhsm.pin_file
        ),
    )
    operator = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "alice"))
    write_issued(operator, layout.client_cert("alice"), layout.client_key("alice"))
    settings = RegistrySettings(
        data_dir=layout.root,
        registry_addr="127.0.0.1:0",
        registry_publish_addr=f"127.0.0.1:{port}",
        registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}",
    )
    context = ssl.create_default_context(cafile=str(layout.root_cert))
    context.load_cert_chain(str(layout.client_cert("alice")), str(layout.client_key("alice")))
    with (
        RegistryServer(settings) as registry,
        httpx.Client(base_url=f"{registry.url}/api/v1", verify=context, timeout=30) as api,
    ):
        yield TokenRegistry(layout, registry, api)


def test_renewal_crl_and_ocsp_are_signed_by_the_token(
    token_registry: TokenRegistry, tmp_path: Path
) -> None:
    layout = token_registry.layout
    ca = CertificateAuthority.load(layout)
    assert isinstance(ca.issuing_key, TokenKey)
    assert not layout.issuing_key.exists() and not layout.root_key.exists()
    cert = token_registry.device(ca, "dev-hsm")
    gone = token_registry.device(ca, "dev-gone")
    # Renewal: the registry's renewer signs a device's CSR with the token.
    csr = build_csr(generate_key(), Identity.device(TRUST_DOMAIN, "dev-hsm"))
    renewed = CertificateRenewer(ca, token_registry.registry.state.engine).renew(
        "dev-hsm", csr.public_bytes(serialization.Encoding.PEM)
    )
    renewed_path = tmp_path / "renewed.crt"
    renewed_path.write_text(renewed.certificate_pem)
    verified = subprocess.run(
        [_openssl(), "verify", "-CAfile", str(layout.root_cert), "-untrusted"]
        + [str(layout.issuing_cert), str(renewed_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stderr
    # The CRL, re-signed after a decommission.
    response = token_registry.operator.post(
        "/devices/dev-gone/decommission", json={"reason": "lost"}
    )
    assert response.status_code == 200, response.text
    crl_der = httpx.get(f"{token_registry.publish_url}/crl.der", timeout=30).content
    crl = x509.load_der_x509_crl(crl_der)
    revoked_serial = x509.load_pem_x509_certificate(gone.read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(revoked_serial) is not None
    crl_path = tmp_path / "crl.der"
    crl_path.write_bytes(crl_der)
    crl_check = subprocess.run(
        [_openssl(), "crl", "-inform", "DER", "-in", str(crl_path), "-noout"]
        + ["-CAfile", str(layout.chain)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert crl_check.returncode == 0 and "verify OK" in crl_check.stderr + crl_check.stdout
    # OCSP: good and revoked, answered with the token's OCSP key.
    for path, status in ((cert, "good"), (gone, "revoked")):
        answer = subprocess.run(
            [_openssl(), "ocsp", "-issuer", str(layout.issuing_cert), "-cert", str(path)]
            + ["-url", f"{token_registry.publish_url}/ocsp", "-CAfile", str(layout.root_cert)]
            + ["-timeout", "10"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        output = answer.stdout + answer.stderr
        assert answer.returncode == 0 and "Response verify OK" in output, output
        assert f"{path}: {status}" in output
    responder = x509.load_pem_x509_certificate(
        (layout.ca_dir / f"{RESPONDER_NAME}.crt").read_bytes()
    )
    assert not (layout.ca_dir / f"{RESPONDER_NAME}.key").exists()
    ocsp_key = ca.ocsp_token_key
    assert ocsp_key is not None and responder.public_key() == ocsp_key.public_key()
