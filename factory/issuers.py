"""Issuing CAs over time: the current one, earlier ones still trusted after a rollover, and
retired ones (issue 26).

On disk, in ``<data>/ca``: ``issuing.crt``/``issuing.key`` is the current issuing CA (every
new certificate is signed by it); ``issuers/<key id>.crt``/``.key`` are earlier issuing CAs
under the same root that still have live certificates (their CRLs and OCSP answers are still
signed); ``retired/`` keeps those no longer trusted. ``trust.pem`` (current, earlier, root) is
what servers verify client certificates against; ``chain.pem`` (current + root) is what is
handed out with new certificates. An issuing CA is named by its key id: the hex of its
Subject Key Identifier, which every certificate it signed carries as Authority Key Identifier.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from factory.errors import CAError
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout, write_public
from fleetcore.profile import PrivateKey

__all__ = [
    "Issuer",
    "build_arl",
    "check_issuer_revocation",
    "apply_revocation",
    "prepare_revocation",
    "authority_key_id",
    "client_and_server_certificates_of",
    "issuer_key_id",
    "previous_issuer_paths",
    "read_certificate",
    "retire_issuer",
    "trusted_issuer_certs",
    "write_trust",
]

PEM = serialization.Encoding.PEM


def issuer_key_id(certificate: x509.Certificate) -> str:
    """A CA certificate's key id: the hex of its Subject Key Identifier."""
    try:
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())
    return ski.digest.hex()


def authority_key_id(certificate: x509.Certificate) -> str | None:
    """The key id of the CA that signed ``certificate`` (its AKI), or None."""
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier.hex() if aki.key_identifier is not None else None


@dataclass(frozen=True)
class Issuer:
    """One issuing CA this process can sign with: its certificate and key."""

    certificate: x509.Certificate
    key: PrivateKey

    @property
    def key_id(self) -> str:
        return issuer_key_id(self.certificate)

    @property
    def name(self) -> str:
        """The CA's common name, for people."""
        names = self.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else self.certificate.subject.rfc4514_string()


def read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CAError(f"CA certificate {path} cannot be read: {exc}") from None


def previous_issuer_paths(layout: DataLayout) -> list[tuple[Path, Path]]:
    """(certificate, key) of every earlier issuing CA still trusted, newest first."""
    if not layout.issuers_dir.is_dir():
        return []
    certs = sorted(layout.issuers_dir.glob("*.crt"), key=lambda p: p.stat().st_mtime_ns)
    return [(cert, cert.with_suffix(".key")) for cert in reversed(certs)]


def trusted_issuer_certs(layout: DataLayout) -> list[x509.Certificate]:
    """The current issuing CA, then every earlier one still trusted (certificates only)."""
    current = read_certificate(layout.issuing_cert)
    current_id = issuer_key_id(current)
    certs = [current]
    for cert_path, _ in previous_issuer_paths(layout):
        cert = read_certificate(cert_path)
        if issuer_key_id(cert) != current_id:
            certs.append(cert)
    return certs


def write_trust(layout: DataLayout) -> None:
    """Rewrite ``trust.pem``: the trusted issuing CAs, then the root."""
    root = read_certificate(layout.root_cert)
    pem = b"".join(cert.public_bytes(PEM) for cert in trusted_issuer_certs(layout))
    write_public(layout.trust, pem + root.public_bytes(PEM))


def retire_issuer(layout: DataLayout, key_id: str) -> Path:
    """Stop trusting the earlier issuing CA ``key_id`` (a prefix of at least 8 hex digits
    is enough): its files move to ``retired/`` and ``trust.pem`` is rewritten. The current
    issuing CA cannot be retired. Returns the retired certificate's new path."""
    cert_path = find_previous(layout, key_id)
    layout.retired_dir.mkdir(parents=True, exist_ok=True)
    moved = layout.retired_dir / cert_path.name
    os.replace(cert_path, moved)
    key_path = cert_path.with_suffix(".key")
    if key_path.exists():
        os.replace(key_path, moved.with_suffix(".key"))
    write_trust(layout)
    return moved


def find_previous(layout: DataLayout, key_id: str) -> Path:
    """The certificate file of the earlier issuing CA named by ``key_id`` (or a prefix)."""
    wanted = key_id.lower().replace(":", "")
    if len(wanted) < 8:
        raise CAError(f"issuer key id {key_id!r} is too short: give at least 8 hex digits")
    current = issuer_key_id(read_certificate(layout.issuing_cert))
    if current.startswith(wanted):
        raise CAError(
            f"{key_id} is the current issuing CA: roll over first ('certfleet ca rollover')"
        )
    matches = [cert for cert, _ in previous_issuer_paths(layout) if cert.stem.startswith(wanted)]
    if len(matches) != 1:
        known = ", ".join(c.stem[:16] for c, _ in previous_issuer_paths(layout)) or "none"
        raise CAError(
            f"no single earlier issuing CA has key id {key_id} (earlier issuing CAs: {known}; "
            "'certfleet ca issuers' lists them)"
        )
    return matches[0]


def read_meta(layout: DataLayout) -> dict[str, object]:
    try:
        meta = json.loads(layout.ca_meta.read_text())
    except (OSError, ValueError) as exc:
        raise CAError(f"{layout.ca_meta} cannot be read: {exc}") from None
    if not isinstance(meta, dict):
        raise CAError(f"{layout.ca_meta} is not a JSON object")
    return meta


def pem_bundle(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(PEM) for cert in certs)


# -- revoking an issuing CA (ca revoke-issuing) ------------------------------------------

#: How long the root's CRL of revoked issuing CAs (ARL) is valid; re-run the command (or
#: ``ca revoke-issuing --resign``) before it lapses.
ARL_NEXT_UPDATE = dt.timedelta(days=365)


def revoked_issuer_serials(layout: DataLayout) -> list[x509.RevokedCertificate]:
    """The entries of the ARL on disk (none when there is none)."""
    if not layout.revoked_issuers.exists():
        return []
    try:
        arl = x509.load_der_x509_crl(layout.revoked_issuers.read_bytes())
    except (OSError, ValueError) as exc:
        raise CAError(f"{layout.revoked_issuers} cannot be read: {exc}") from None
    return list(arl)


def build_arl(
    root_cert: x509.Certificate,
    root_key: PrivateKey,
    entries: Sequence[x509.RevokedCertificate],
    crl_number: int,
) -> x509.CertificateRevocationList:
    """The root's CRL listing revoked issuing CAs (an ARL: onlyContainsCACerts)."""
    now = utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root_cert.subject)
        .last_update(now - dt.timedelta(minutes=1))
        .next_update(now + ARL_NEXT_UPDATE)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.IssuingDistributionPoint(
                full_name=None,
                relative_name=None,
                only_contains_user_certs=False,
                only_contains_ca_certs=True,
                only_some_reasons=None,
                indirect_crl=False,
                only_contains_attribute_certs=False,
            ),
            critical=True,
        )
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    algorithm = None if isinstance(root_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(root_key, algorithm)


def prepare_revocation(
    layout: DataLayout, key_id: str, root_key: PrivateKey
) -> tuple[Path, x509.Certificate, x509.CertificateRevocationList]:
    """The root-signed ARL listing the earlier issuing CA ``key_id`` (and every one revoked
    before); nothing is written. The current issuing CA cannot be revoked: roll over first.
    Returns the CA's certificate file, the CA and the ARL (for :func:`apply_revocation`)."""
    cert_path = find_previous(layout, key_id)
    issuing = read_certificate(cert_path)
    root = read_certificate(layout.root_cert)
    entries = [
        e for e in revoked_issuer_serials(layout) if e.serial_number != issuing.serial_number
    ]
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(issuing.serial_number)
        .revocation_date(utcnow())
        .add_extension(x509.CRLReason(x509.ReasonFlags.ca_compromise), critical=False)
        .build()
    )
    arl = build_arl(root, root_key, [*entries, entry], crl_number=len(entries) + 1)
    return cert_path, issuing, arl


def apply_revocation(
    layout: DataLayout, cert_path: Path, arl: x509.CertificateRevocationList
) -> None:
    """Write the ARL (``ca/revoked-issuers.crl``), move the revoked CA to ``retired/``
    (``<key id>.revoked.crt``) and rewrite ``trust.pem`` without it."""
    write_public(layout.revoked_issuers, arl.public_bytes(serialization.Encoding.DER))
    layout.retired_dir.mkdir(parents=True, exist_ok=True)
    moved = layout.retired_dir / f"{cert_path.stem}.revoked.crt"
    os.replace(cert_path, moved)
    key_path = cert_path.with_suffix(".key")
    if key_path.exists():
        os.replace(key_path, moved.with_suffix(".key"))
    write_trust(layout)


def check_issuer_revocation(
    root: x509.Certificate, issuing: x509.Certificate, arl: x509.CertificateRevocationList
) -> str:
    """The key id of ``issuing`` when ``arl`` is the root's signed CRL listing it (what the
    registry asks before it acts on a revoke-issuing); CAError otherwise."""
    try:
        issuing.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise CAError("the issuing CA certificate was not signed by this root") from None
    if arl.issuer != root.subject or not arl.is_signature_valid(root.public_key()):  # type: ignore[arg-type]
        raise CAError("the revocation list was not signed by this root")
    if arl.get_revoked_certificate_by_serial_number(issuing.serial_number) is None:
        raise CAError("the root's revocation list does not list this issuing CA")
    return issuer_key_id(issuing)


def client_and_server_certificates_of(layout: DataLayout, key_id: str) -> list[Path]:
    """The client (``clients/``) and server (``tls/``) certificates in this data folder that
    the issuing CA ``key_id`` signed: after ``revoke-issuing`` the registry and the brokers
    refuse the client ones, so they are re-issued under the current issuing CA."""
    found: list[Path] = []
    for folder in (layout.clients_dir, layout.tls_dir):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.crt")):
            try:
                leaf = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            if authority_key_id(leaf) == key_id:
                found.append(path)
    return found
