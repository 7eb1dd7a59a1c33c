"""CRLs signed by the issuing CA: complete (base) CRLs and delta CRLs (RFC 5280 5.2.4).

Built in time linear in the entries: cryptography's builder is immutable and copies its
list on every ``add_revoked_certificate`` (quadratic: 100,000 entries took 11.9 s), so the
builder is made once, by its constructor, with the finished entry list and extension list.

A *base* CRL lists every revoked certificate still valid and, when the CA publishes, names
the delta CRL's URL in its Freshest CRL extension. A *delta* CRL lists what was revoked since
a base and carries the critical Delta CRL Indicator naming that base's CRL number; it has the
base's Issuing Distribution Point (OpenSSL matches a delta to its base by issuer, AKI and IDP).
Both share one CRLNumber sequence (the caller's), so a delta's number is above its base's.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding

from factory.crl_der import entries_der, splice_and_sign
from fleetcore.clock import naive_utc, utcnow
from fleetcore.profile import PrivateKey
from fleetcore.publication import freshest_crl, issuing_distribution_point

__all__ = ["RevokedEntry", "build_crl", "build_crl_der", "crl_pem", "without_der"]

#: From this many entries on, the entries are encoded to DER here (:mod:`factory.crl_der`:
#: a third of the time at 530,000 entries); below, the library makes them one by one.
SPLICE_FROM = 2_000

P = ParamSpec("P")
Crl = x509.CertificateRevocationList

#: lastUpdate is set this far back: a relying party with a slightly fast clock accepts it.
LAST_UPDATE_SKEW = dt.timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One line of a CRL."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags = x509.ReasonFlags.cessation_of_operation


def crl_pem(der: bytes) -> bytes:
    """A CRL's DER as PEM (RFC 7468 ``X509 CRL``), as ``public_bytes(PEM)`` writes it."""
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN X509 CRL-----\n" + b"\n".join(lines) + b"\n-----END X509 CRL-----\n"


def build_crl_der(
    issuing_cert: x509.Certificate,
    issuing_key: PrivateKey,
    revoked: Sequence[RevokedEntry],
    *,
    next_update: dt.timedelta,
    crl_number: int,
    publish_url: str | None = None,
    delta_of: int | None = None,
) -> tuple[x509.CertificateRevocationList, bytes]:
    """A CRL listing ``revoked``, signed by ``issuing_key``, and its DER.

    With ``delta_of`` (the base CRL's number) a delta CRL: the critical Delta CRL Indicator,
    no Freshest CRL. Without it a base CRL, whose Freshest CRL names the delta's URL when the
    CA publishes (``publish_url``).
    """
    now = utcnow()
    issuer_ski = issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        _extension(x509.CRLNumber(crl_number), critical=False),
        _extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        ),
    ]
    if publish_url is not None:
        extensions.append(_extension(issuing_distribution_point(publish_url), critical=True))
    if delta_of is not None:
        extensions.append(_extension(x509.DeltaCRLIndicator(delta_of), critical=True))
    elif publish_url is not None:
        extensions.append(_extension(freshest_crl(publish_url), critical=False))
    large = len(revoked) >= SPLICE_FROM
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuing_cert.subject,
        last_update=naive_utc(now - LAST_UPDATE_SKEW),
        next_update=naive_utc(now + next_update),
        extensions=extensions,
        revoked_certificates=[] if large else _revoked_certificates(revoked),
    )
    algorithm = None if isinstance(issuing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    crl = builder.sign(issuing_key, algorithm)
    if not large:
        return crl, crl.public_bytes(Encoding.DER)
    entries = entries_der((e.serial, e.revoked_at, e.reason) for e in revoked)
    return splice_and_sign(crl, entries, issuing_key)


def without_der(make: Callable[P, tuple[Crl, bytes]]) -> Callable[P, Crl]:
    """A CRL builder returning the CRL alone, from one returning it with its DER."""

    @functools.wraps(make)
    def crl_only(*args: P.args, **kwargs: P.kwargs) -> Crl:
        return make(*args, **kwargs)[0]

    return crl_only


#: :func:`build_crl_der`'s CRL alone (same arguments).
build_crl = without_der(build_crl_der)


def _revoked_certificates(revoked: Sequence[RevokedEntry]) -> list[x509.RevokedCertificate]:
    """The entries, each through the library's own entry builder (its constructor: the
    setters would copy it per field); the CRLReason extension made once per reason."""
    reasons: dict[x509.ReasonFlags, list[x509.Extension[x509.ExtensionType]]] = {}
    entries = []
    for entry in revoked:
        extensions = reasons.get(entry.reason)
        if extensions is None:
            extensions = reasons[entry.reason] = [
                _extension(x509.CRLReason(entry.reason), critical=False)
            ]
        entries.append(
            x509.RevokedCertificateBuilder(
                serial_number=entry.serial,
                revocation_date=naive_utc(entry.revoked_at),
                extensions=extensions,
            ).build()
        )
    return entries


def _extension(value: x509.ExtensionType, *, critical: bool) -> x509.Extension[x509.ExtensionType]:
    return x509.Extension(value.oid, critical, value)
