"""EST on the wire (RFC 7030 section 4, RFC 8951): base64 bodies, PKCS#7 certs-only, CSR
attributes.

RFC 8951 settles that every EST body is base64-encoded DER whatever the
``Content-Transfer-Encoding`` header says; a client sending PEM or raw DER where base64 is
due gets a 400 naming what it sent. Answers carry ``Content-Transfer-Encoding: base64``
for the clients written against RFC 7030's text.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from registry.est.errors import EstBadRequestError, PayloadTooLargeError

__all__ = [
    "CSRATTRS_TYPE",
    "MAX_BODY_BYTES",
    "PKCS7_CERTS_ONLY_TYPE",
    "PKCS7_TYPE",
    "base64_body",
    "certs_only",
    "csr_attributes",
    "decode_csr_body",
]

PKCS7_TYPE: Final = "application/pkcs7-mime"
PKCS7_CERTS_ONLY_TYPE: Final = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS_TYPE: Final = "application/csrattrs"
PKCS10_TYPE: Final = "application/pkcs10"
#: A CSR of 16 KiB (the MQTT renewal's limit) in base64 with line breaks.
MAX_BODY_BYTES: Final = 24 * 1024

_BASE64_TEXT = re.compile(rb"^[A-Za-z0-9+/=\r\n\t ]*$")


def base64_body(der: bytes) -> bytes:
    """``der`` as an EST body: base64 in one line. RFC 7030 allows line breaks, but
    strongSwan's ``pki --est`` (5.9) decodes the body without skipping them."""
    return base64.b64encode(der)


def certs_only(certificates: list[x509.Certificate]) -> bytes:
    """A certs-only CMC "Simple PKI Response" (degenerate PKCS#7 SignedData), base64."""
    return base64_body(pkcs7.serialize_certificates(certificates, Encoding.DER))


def decode_csr_body(body: bytes, content_type: str | None) -> bytes:
    """The DER CSR of an ``application/pkcs10`` body; EstBadRequestError naming what was
    sent when it is not base64 DER, PayloadTooLargeError over :data:`MAX_BODY_BYTES`."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(
            f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES} bytes; a CSR is "
            "a few hundred bytes of base64"
        )
    media = (content_type or "").split(";")[0].strip().lower()
    if media != PKCS10_TYPE:
        raise EstBadRequestError(
            f"Content-Type {content_type or '(none)'!r} is not {PKCS10_TYPE} (RFC 7030 4.2.1)"
        )
    stripped = body.strip()
    if not stripped:
        raise EstBadRequestError("empty body: send the CSR as base64-encoded DER")
    if stripped.startswith(b"-----BEGIN"):
        raise EstBadRequestError(
            "the body is PEM; EST wants the CSR as base64-encoded DER without the "
            "-----BEGIN/END----- lines (RFC 8951)"
        )
    if not _BASE64_TEXT.fullmatch(stripped):
        raise EstBadRequestError(
            "the body is binary (raw DER?); EST wants the CSR as base64-encoded DER, "
            "whatever Content-Transfer-Encoding says (RFC 8951)"
        )
    try:
        der = base64.b64decode(b"".join(stripped.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EstBadRequestError(f"the body is not valid base64: {exc}") from None
    return der


# -- CSR attributes (RFC 7030 4.5.2, RFC 8951 section 4) -------------------------------------
#
# CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID
# AttrOrOID ::= CHOICE { oid OBJECT IDENTIFIER, attribute Attribute }
# Attribute ::= SEQUENCE { type OBJECT IDENTIFIER, values SET SIZE(1..MAX) OF ANY }

_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_SECP256R1 = "1.2.840.10045.3.1.7"
_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
_COMMON_NAME = "2.5.4.3"
_SERIAL_NUMBER = "2.5.4.5"
_SUBJECT_ALT_NAME = "2.5.29.17"


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    body = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def csr_attributes() -> bytes:
    """What our profile wants in a CSR, as an ``application/csrattrs`` body (base64 DER): an
    EC P-256 key (id-ecPublicKey with secp256r1), signed with ecdsa-with-SHA256, the device
    id as CN (or as the one URI SAN ``spiffe://<td>/device/<id>``), the hardware serial as
    serialNumber where a claim's allow-list names serials."""
    ec_key = _tlv(0x30, _oid(_EC_PUBLIC_KEY) + _tlv(0x31, _oid(_SECP256R1)))
    items = [
        ec_key,
        _oid(_ECDSA_WITH_SHA256),
        _oid(_COMMON_NAME),
        _oid(_SERIAL_NUMBER),
        _oid(_SUBJECT_ALT_NAME),
    ]
    return base64_body(_tlv(0x30, b"".join(items)))
