"""What the certificate profile reads out of a certificate file, for ``certificate inspect``.

PEM or DER; a PEM file with several certificates (leaf + chain) is read for its first one.
The kind comes from the profile: ``device``/``service``/``operator`` when
:func:`fleetcore.profile.read_identity` accepts it, else ``server``, ``ocsp-responder``,
``ca`` or ``other`` from its extensions, with the reason it is not a client identity.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from fleetcore.clock import utcnow
from fleetcore.errors import IdentityError
from fleetcore.profile import read_identity, serial_hex

__all__ = ["describe", "load_certificate_file", "ocsp_urls"]


def load_certificate_file(path: Path) -> x509.Certificate:
    """The (first) certificate in ``path``, PEM or DER; IdentityError if there is none."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)[0]
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{path} holds no readable PEM or DER certificate ({exc})") from None


def _extension(certificate: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def ocsp_urls(certificate: x509.Certificate) -> list[str]:
    aia = _extension(certificate, x509.AuthorityInformationAccess)
    return [
        str(d.access_location.value)
        for d in aia or []
        if d.access_method == AuthorityInformationAccessOID.OCSP
    ]


def _crl_urls(certificate: x509.Certificate) -> list[str]:
    points = _extension(certificate, x509.CRLDistributionPoints)
    return [str(name.value) for point in points or [] for name in point.full_name or []]


def _kind_without_identity(certificate: x509.Certificate) -> str:
    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        return "ca"
    eku = list(_extension(certificate, x509.ExtendedKeyUsage) or [])
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        return "server"
    if ExtendedKeyUsageOID.OCSP_SIGNING in eku:
        return "ocsp-responder"
    return "other"


def describe(certificate: x509.Certificate, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The certificate as the profile sees it, JSON-ready."""
    now = now or utcnow()
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    kind = _kind_without_identity(certificate)
    identity_uri: str | None = None
    name: str | None = None
    trust_domain: str | None = None
    problem: str | None = None
    try:
        identity = read_identity(certificate)
    except IdentityError as exc:
        problem = str(exc)
    else:
        kind, identity_uri = identity.kind.value, identity.uri
        name, trust_domain = identity.name, identity.trust_domain
    san = _extension(certificate, x509.SubjectAlternativeName)
    validity = "valid"
    if now < not_before:
        validity = "not yet valid"
    elif now >= not_after:
        validity = "expired"
    return {
        "kind": kind,
        "identity": identity_uri,
        "name": name,
        "trust_domain": trust_domain,
        "not_an_identity_because": problem,
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": serial_hex(certificate.serial_number),
        "not_before": not_before.isoformat(),
        "not_after": not_after.isoformat(),
        "validity": validity,
        "days_left": (not_after - now).days,
        "dns_names": san.get_values_for_type(x509.DNSName) if san else [],
        "ip_addresses": [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] if san else [],
        "crl_urls": _crl_urls(certificate),
        "ocsp_urls": ocsp_urls(certificate),
        "sha256_fingerprint": certificate.fingerprint(hashes.SHA256()).hex(),
    }
