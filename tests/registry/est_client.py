"""EST test helpers: claims recorded in a real registry, CSRs as devices make them, and an
httpx EST client over real TLS (with or without a client certificate)."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from factory.ca import write_issued
from factory.claims import AllowEntry, mint_claim
from fleetcore.keys import generate_key
from fleetcore.profile import Identity, PrivateKey
from tests.conftest import TRUST_DOMAIN, TestPKI

__all__ = [
    "ClaimFiles",
    "csr_der",
    "est_client",
    "make_claim",
    "parse_certs_only",
]

EST = "/.well-known/est"


@dataclass(frozen=True)
class ClaimFiles:
    batch: str
    cert: Path
    key: Path
    serial: int


def make_claim(
    pki: TestPKI,
    registrar: httpx.Client,
    folder: Path,
    batch: str,
    *,
    quota: int = 10,
    allow: list[AllowEntry] | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=1),
    expires_at: dt.datetime | None = None,
    webhook_url: str | None = None,
) -> ClaimFiles:
    """Mint batch ``batch``'s claim (with its own webhook ``webhook_url``) and record it
    through ``POST /api/v1/claims``."""
    issued, record = mint_claim(
        pki.ca, batch, quota=quota, lifetime=lifetime, allow=allow or [], webhook_url=webhook_url
    )
    body = record.as_json()
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    response = registrar.post("/claims", json=body)
    assert response.status_code == 201, response.text
    cert, key = folder / f"{batch}.crt", folder / f"{batch}.key"
    write_issued(issued, cert, key)
    return ClaimFiles(batch, cert, key, issued.certificate.serial_number)


def csr_der(
    key: PrivateKey | None = None,
    *,
    device_id: str | None = None,
    hardware_serial: str | None = None,
    uri: bool = False,
) -> tuple[bytes, PrivateKey]:
    """A CSR as a device makes it: CN = device id (and the device URI SAN when ``uri``),
    serialNumber = hardware serial; DER."""
    key = key if key is not None else generate_key()
    names = []
    if device_id is not None:
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, device_id))
    if hardware_serial is not None:
        names.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, hardware_serial))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if uri and device_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(Identity.device(TRUST_DOMAIN, device_id).uri)]
            ),
            critical=False,
        )
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key


def est_client(
    pki: TestPKI, base_url: str, cert: tuple[Path, Path] | None = None, **kwargs: object
) -> httpx.Client:
    """An EST client trusting our root, presenting ``cert`` (cert, key) when given."""
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return httpx.Client(base_url=f"{base_url}{EST}", verify=context, timeout=30, **kwargs)  # type: ignore[arg-type]


def enroll(client: httpx.Client, der: bytes, path: str = "/simpleenroll") -> httpx.Response:
    return client.post(
        path,
        content=base64.encodebytes(der),
        headers={"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"},
    )


def parse_certs_only(response: httpx.Response) -> list[x509.Certificate]:
    """The certificates of a certs-only PKCS#7 answer, checking its EST headers."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/pkcs7-mime")
    assert response.headers["content-transfer-encoding"] == "base64"
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
