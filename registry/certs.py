"""Reading a device certificate handed to the registry: ours, a device, well-formed."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fleetcore.errors import IdentityError
from fleetcore.profile import IdentityKind, read_identity, serial_hex
from registry.errors import InvalidCertificateError

__all__ = ["ParsedCertificate", "parse_device_certificate"]

_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"


@dataclass(frozen=True, slots=True)
class ParsedCertificate:
    """What the registry stores about one device certificate."""

    device_id: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    certificate_pem: str


def parse_device_certificate(
    certificate_pem: str,
    *,
    issuing_cert: x509.Certificate | Sequence[x509.Certificate],
    trust_domain: str,
) -> ParsedCertificate:
    """Parse and check one device leaf; raise InvalidCertificateError saying what is wrong.

    The certificate must be exactly one PEM certificate, signed by ``issuing_cert`` (checked
    with the issuing public key; after a rollover, by any of the trusted issuing CAs given,
    matched by name), and carry one device identity in ``trust_domain``.
    """
    issuers = [issuing_cert] if isinstance(issuing_cert, x509.Certificate) else issuing_cert
    if certificate_pem.count(_PEM_BEGIN) != 1:
        raise InvalidCertificateError(
            "certificate_pem must hold exactly one PEM certificate (the device leaf, "
            f"without its chain); found {certificate_pem.count(_PEM_BEGIN)}"
        )
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode("utf-8", "replace"))
    except ValueError:
        raise InvalidCertificateError(
            "certificate_pem is not a readable PEM X.509 certificate"
        ) from None
    issuer = next((i for i in issuers if i.subject == certificate.issuer), issuers[0])
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        names = "; ".join(i.subject.rfc4514_string() for i in issuers)
        raise InvalidCertificateError(
            f"certificate was not issued by this registry's issuing CA ({names})"
        ) from None
    try:
        identity = read_identity(certificate)
    except (IdentityError, ValueError) as exc:
        raise InvalidCertificateError(f"certificate carries no usable identity: {exc}") from None
    if identity.kind is not IdentityKind.DEVICE:
        raise InvalidCertificateError(
            f"certificate identity {identity.uri} is a {identity.kind.value}, not a device"
        )
    if identity.trust_domain != trust_domain:
        raise InvalidCertificateError(
            f"certificate identity {identity.uri} is outside trust domain {trust_domain}"
        )
    return ParsedCertificate(
        device_id=identity.name,
        serial=serial_hex(certificate.serial_number),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        certificate_pem=_pem_block(certificate_pem),
    )


def _pem_block(certificate_pem: str) -> str:
    """The BEGIN..END block as sent (it parsed, so it is well-formed), without surrounding
    text; cheaper than re-encoding, which matters at thousands of certificates a second."""
    start = certificate_pem.index(_PEM_BEGIN)
    end = certificate_pem.index(_PEM_END, start) + len(_PEM_END)
    return certificate_pem[start:end].replace("\r\n", "\n") + "\n"
