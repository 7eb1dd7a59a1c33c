"""Check device-generated CSRs for the device profile (the key never leaves the device).

A CSR is refused (CSRError) when: it is not a PEM/DER CSR, its signature does not verify,
its key is weak or unsupported (RSA < 2048, curves other than P-256/P-384, DSA, ...), it asks
for a CA certificate (basicConstraints CA:TRUE), or its identity is foreign: not exactly one
URI SAN, not a SPIFFE device id, another trust domain, or a CN that differs from the device id.
Only the identity and the public key are taken from the CSR; every extension of the issued
certificate comes from the profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa
from cryptography.x509.oid import NameOID

from factory.errors import CSRError
from fleetcore.errors import IdentityError
from fleetcore.profile import (
    HARDWARE_SERIAL_PATTERN,
    Identity,
    IdentityKind,
    PublicKey,
    check_device_id,
    check_public_key,
)

__all__ = [
    "EnrollmentCSR",
    "ValidatedCSR",
    "check_possession",
    "load_csr",
    "validate_device_csr",
    "validate_enrollment_csr",
]


@dataclass(frozen=True, slots=True)
class ValidatedCSR:
    """A CSR that passed every check: who it is for and the key to certify."""

    identity: Identity
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class EnrollmentCSR:
    """A first-enrollment (EST) CSR that proves possession of its key, and what it asks
    for: a device id (its device URI SAN, else its CN) and/or a hardware serial (its
    subject serialNumber). What it gets is the credential's decision, not the CSR's."""

    device_id: str | None
    hardware_serial: str | None
    public_key: PublicKey


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM (or DER) CSR; CSRError if it is neither."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CSRError(f"not a certificate signing request (PEM or DER): {exc}") from None


def check_possession(csr: x509.CertificateSigningRequest) -> PublicKey:
    """The CSR's key when its signature verifies (possession), the key is strong enough and
    no CA certificate is asked for; CSRError otherwise."""
    try:
        signature_ok = csr.is_signature_valid
    except Exception as exc:  # an unsupported signature algorithm raises instead of False
        raise CSRError(f"CSR signature cannot be checked: {exc}") from None
    if not signature_ok:
        raise CSRError("CSR signature does not verify: the request was altered or mis-signed")

    public_key = csr.public_key()
    if isinstance(public_key, dsa.DSAPublicKey):
        raise CSRError("CSR key is DSA, which is not supported; use EC P-256 (or P-384)")
    try:
        checked_key = check_public_key(public_key)
    except IdentityError as exc:
        raise CSRError(f"CSR key refused: {exc}") from None

    try:
        constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError as exc:
        raise CSRError(f"CSR extensions cannot be parsed: {exc}") from None
    if constraints is not None and constraints.ca:
        raise CSRError("CSR requests a CA certificate (basicConstraints CA:TRUE); refused")
    return checked_key


def validate_device_csr(csr: x509.CertificateSigningRequest, trust_domain: str) -> ValidatedCSR:
    """Check a device CSR against the profile; return its identity and key or raise CSRError."""
    checked_key = check_possession(csr)

    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CSRError(
            "CSR has no subjectAltName: it must carry exactly one URI "
            f"spiffe://{trust_domain}/device/<device-id>"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CSRError(f"CSR carries {len(uris)} URI SANs; exactly one device identity is required")
    others = [name for name in san if not isinstance(name, x509.UniformResourceIdentifier)]
    if others:
        raise CSRError("CSR subjectAltName may hold only the device URI (found DNS/IP/email names)")
    try:
        identity = Identity.parse(uris[0])
    except IdentityError as exc:
        raise CSRError(f"CSR identity refused: {exc}") from None
    if identity.trust_domain != trust_domain:
        raise CSRError(
            f"CSR identity {identity.uri} belongs to trust domain {identity.trust_domain!r}, "
            f"not ours ({trust_domain!r})"
        )
    if identity.kind is not IdentityKind.DEVICE:
        raise CSRError(
            f"CSR identity {identity.uri} is a {identity.kind.value}, not a device; "
            "sign-csr issues device certificates only"
        )
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != identity.name:
        found = ", ".join(str(cn.value) for cn in cns) or "none"
        raise CSRError(f"CSR CN ({found}) does not match its device id {identity.name!r}")
    return ValidatedCSR(identity, checked_key)


def validate_enrollment_csr(
    csr: x509.CertificateSigningRequest, trust_domain: str
) -> EnrollmentCSR:
    """Check an EST CSR (signature, key, CA:FALSE, at most a device identity of ours) and
    read what it asks for; CSRError otherwise. Standard EST clients (strongSwan's ``pki``)
    cannot write URI SANs, so the CN alone may name the device."""
    checked_key = check_possession(csr)
    try:
        san: x509.SubjectAlternativeName | None = csr.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        san = None
    except ValueError as exc:
        raise CSRError(f"CSR extensions cannot be parsed: {exc}") from None
    device_id: str | None = None
    if san is not None:
        if any(not isinstance(name, x509.UniformResourceIdentifier) for name in san):
            raise CSRError("CSR subjectAltName may hold only a device URI (found other names)")
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) > 1:
            raise CSRError(f"CSR carries {len(uris)} URI SANs; at most one device identity")
        if uris:
            try:
                identity = Identity.parse(uris[0])
            except IdentityError as exc:
                raise CSRError(f"CSR identity refused: {exc}") from None
            if identity.trust_domain != trust_domain or identity.kind is not IdentityKind.DEVICE:
                raise CSRError(
                    f"CSR identity {identity.uri} is not a device of trust domain {trust_domain}"
                )
            device_id = identity.name
    cns = [str(cn.value) for cn in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) > 1:
        raise CSRError(f"CSR has {len(cns)} CNs; at most one (the device id)")
    if cns:
        if device_id is not None and cns[0] != device_id:
            raise CSRError(f"CSR CN ({cns[0]}) does not match its device id {device_id!r}")
        try:
            device_id = check_device_id(cns[0])
        except IdentityError as exc:
            raise CSRError(f"CSR CN refused: {exc}") from None
    serials = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    if len(serials) > 1:
        raise CSRError(f"CSR has {len(serials)} serialNumber attributes; at most one")
    hardware_serial = serials[0] if serials else None
    if hardware_serial is not None and not HARDWARE_SERIAL_PATTERN.fullmatch(hardware_serial):
        raise CSRError("CSR serialNumber is not 1-128 printable characters without spaces")
    return EnrollmentCSR(device_id, hardware_serial, checked_key)
