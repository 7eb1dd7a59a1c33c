"""A certificate naming a device like a service (minted elsewhere, or before the factory
refused it) is refused at registration (issue 11.7)."""

from __future__ import annotations

import datetime as dt

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.pki import TRUST_DOMAIN, TestPKI


def _device_certificate_named(pki: TestPKI, name: str) -> str:
    """A device certificate our CA signed, built by hand (the factory refuses the name)."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(pki.ca.issuing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/{name}")]
            ),
            critical=False,
        )
        .sign(pki.ca.issuing_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return certificate.public_bytes(Encoding.PEM).decode()


def test_registration_refuses_a_device_named_like_a_service(
    pki: TestPKI, operator: httpx.Client
) -> None:
    for name in ("registry", "broker"):
        response = operator.post(
            "/devices", json={"certificate_pem": _device_certificate_named(pki, name)}
        )
        assert response.status_code == 422, response.text
        assert f"device id '{name}' is reserved for a service" in response.text
        assert operator.get(f"/devices/{name}").status_code == 404
