"""Asking an OCSP responder about one certificate, checking the answer before believing it.

The answer must be signed by the issuer itself or by a responder certificate the issuer
issued with the OCSPSigning EKU, be about the certificate asked for, and echo our nonce.
Used by ``certfleet certificate inspect``; our own responder is registry/ocsp.py.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from factory.errors import OcspCheckError

__all__ = ["OcspAnswer", "OcspCheckError", "ask_ocsp"]


@dataclass(frozen=True, slots=True)
class OcspAnswer:
    status: str  # good | revoked | unknown
    revoked_at: dt.datetime | None
    reason: str | None
    this_update: dt.datetime
    next_update: dt.datetime | None


def _verify_signature(signer: x509.Certificate, response: ocsp.OCSPResponse) -> None:
    public_key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey) and algorithm is not None:
            public_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey) and algorithm is not None:
            public_key.verify(
                response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm
            )
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(response.signature, response.tbs_response_bytes)
        else:
            raise OcspCheckError("OCSP answer signed with an unsupported key type")
    except InvalidSignature:
        raise OcspCheckError("OCSP answer signature does not verify") from None


def _signer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    """The certificate that signed the answer: the issuer, or a responder it delegated to."""
    for candidate in response.certificates:
        try:
            candidate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        eku = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.OCSP_SIGNING in eku:
            return candidate
    return issuer


def ask_ocsp(
    certificate: x509.Certificate, issuer: x509.Certificate, url: str, *, timeout_s: float = 10
) -> OcspAnswer:
    """POST an OCSP request for ``certificate`` to ``url`` and return the checked answer."""
    nonce = os.urandom(16)
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA256())
        .add_extension(x509.OCSPNonce(nonce), critical=False)
        .build()
    )
    try:
        reply = httpx.post(
            url,
            content=request.public_bytes(serialization.Encoding.DER),
            headers={"content-type": "application/ocsp-request"},
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise OcspCheckError(f"OCSP responder {url} unreachable ({type(exc).__name__})") from None
    if reply.status_code != 200:
        raise OcspCheckError(f"OCSP responder {url} answered HTTP {reply.status_code}")
    try:
        response = ocsp.load_der_ocsp_response(reply.content)
    except ValueError:
        raise OcspCheckError(f"OCSP responder {url} sent something that is not OCSP") from None
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspCheckError(f"OCSP responder {url} said {response.response_status.name}")
    _verify_signature(_signer(response, issuer), response)
    if response.serial_number != certificate.serial_number:
        raise OcspCheckError("OCSP answer is about another certificate")
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        echoed = None
    if echoed != nonce:
        raise OcspCheckError("OCSP answer does not echo our nonce (a replayed answer?)")
    reason = response.revocation_reason
    return OcspAnswer(
        status=response.certificate_status.name.lower(),
        revoked_at=response.revocation_time_utc,
        reason=reason.value if reason is not None else None,
        this_update=response.this_update_utc,
        next_update=response.next_update_utc,
    )
