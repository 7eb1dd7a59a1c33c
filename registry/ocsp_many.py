"""OCSP requests for several certificates (RFC 6960 4.1.1), read and answered with asn1crypto.

cryptography reads a request about one certificate only (NotImplementedError otherwise) and
builds an answer about one; :mod:`registry.ocsp` keeps using it for that common case and
hands a request about several to :func:`read_request` and :func:`build_response`. The
answer is signed with the same delegated responder key, the nonce echoed, each
certificate's CertID copied from the request as RFC 6960 asks.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asn1crypto import core as asn1_core
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from fleetcore.profile import PrivateKey

if TYPE_CHECKING:
    from registry.ocsp import CertificateStatus

__all__ = ["CertId", "ManyRequest", "build_response", "read_request"]


@dataclass(frozen=True, slots=True)
class CertId:
    """One certificate asked about: the issuer's name and key hashes, and the serial."""

    hash_name: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int


@dataclass(frozen=True, slots=True)
class ManyRequest:
    """A parsed request: what was asked (in order), the CertIDs as sent, the nonce if any."""

    asked: list[CertId]
    cert_ids_der: list[bytes]
    nonce: bytes | None


#: cryptography's reason flags (their values) as asn1crypto's CRLReason names.
_REASONS = {
    "unspecified": "unspecified",
    "keyCompromise": "key_compromise",
    "cACompromise": "ca_compromise",
    "affiliationChanged": "affiliation_changed",
    "superseded": "superseded",
    "cessationOfOperation": "cessation_of_operation",
    "certificateHold": "certificate_hold",
    "removeFromCRL": "remove_from_crl",
    "privilegeWithdrawn": "privilege_withdrawn",
    "aACompromise": "aa_compromise",
}


def read_request(der: bytes) -> ManyRequest:
    """Parse a DER OCSP request (any number of certificates); ValueError when malformed."""
    try:
        request = asn1_ocsp.OCSPRequest.load(der, strict=True)
        tbs = request["tbs_request"]
        asked, ids = [], []
        for item in tbs["request_list"]:
            cert_id = item["req_cert"]
            asked.append(
                CertId(
                    str(cert_id["hash_algorithm"]["algorithm"].native),
                    bytes(cert_id["issuer_name_hash"].native),
                    bytes(cert_id["issuer_key_hash"].native),
                    int(cert_id["serial_number"].native),
                )
            )
            ids.append(cert_id.dump())
        nonce = request.nonce_value
        nonce_bytes = None if nonce is None else bytes(nonce.native)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not an OCSP request: {exc}") from None
    if not asked:
        raise ValueError("the OCSP request asks about no certificate")
    return ManyRequest(asked, ids, nonce_bytes)


def _cert_status(status: CertificateStatus) -> asn1_ocsp.CertStatus:
    if status.status != "revoked":
        return asn1_ocsp.CertStatus(name=status.status, value=asn1_core.Null())
    info: dict[str, Any] = {"revocation_time": _second(status.revoked_at)}
    if status.reason is not None:
        info["revocation_reason"] = _REASONS[status.reason.value]
    return asn1_ocsp.CertStatus(name="revoked", value=info)


def _second(value: dt.datetime | None) -> dt.datetime:
    assert value is not None
    return value.astimezone(dt.UTC).replace(microsecond=0)


def _signature(key: PrivateKey, data: bytes) -> tuple[str, bytes]:
    """The signature algorithm's asn1crypto name and the signature over ``data``."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "sha256_ecdsa", key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return "sha256_rsa", key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return "ed25519", key.sign(data)


def build_response(
    request: ManyRequest,
    statuses: list[CertificateStatus],
    responder_cert: x509.Certificate,
    responder_key: PrivateKey,
    *,
    responder_key_hash: bytes,
    produced_at: dt.datetime,
    backdate: dt.timedelta,
    validity: dt.timedelta,
) -> bytes:
    """The signed DER answer: one SingleResponse per certificate asked, in order."""
    responses = [
        {
            "cert_id": asn1_ocsp.CertId.load(cert_id),
            "cert_status": _cert_status(status),
            "this_update": _second(produced_at - backdate),
            "next_update": _second(produced_at + validity),
        }
        for cert_id, status in zip(request.cert_ids_der, statuses, strict=True)
    ]
    data: dict[str, Any] = {
        "responder_id": asn1_ocsp.ResponderId(name="by_key", value=responder_key_hash),
        "produced_at": _second(produced_at),
        "responses": responses,
    }
    if request.nonce is not None:
        data["response_extensions"] = [
            {"extn_id": "nonce", "critical": False, "extn_value": request.nonce}
        ]
    tbs = asn1_ocsp.ResponseData(data)
    algorithm, signature = _signature(responder_key, tbs.dump())
    basic = asn1_ocsp.BasicOCSPResponse(
        {
            "tbs_response_data": tbs,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": signature,
            "certs": [
                asn1_x509.Certificate.load(responder_cert.public_bytes(serialization.Encoding.DER))
            ],
        }
    )
    response = asn1_ocsp.OCSPResponse(
        {
            "response_status": "successful",
            "response_bytes": {"response_type": "basic_ocsp_response", "response": basic},
        }
    )
    der: bytes = response.dump()
    return der
