"""Every certificate builder of the fleet, to the profile of :mod:`fleetcore.profile`: CA
certificates (root, issuing), client certificates (device, service, operator, claim; one
:class:`ClientCertificateTemplate` per issuer mints them fast), TLS server certificates and
delegated OCSP responder certificates. The identity model (what goes in a SAN, which names,
keys and serials are valid) stays in :mod:`fleetcore.profile`; this module only builds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetcore.clock import naive_utc
from fleetcore.errors import IdentityError
from fleetcore.profile import (
    OPERATOR_ROLE_OID,
    UTF8STRING_TAG,
    Identity,
    IdentityKind,
    OperatorRole,
    PrivateKey,
    PublicKey,
    check_name,
    check_public_key,
    new_serial,
)
from fleetcore.publication import leaf_publication_extensions

__all__ = [
    "ClientCertificateTemplate",
    "build_ca_certificate",
    "build_leaf_certificate",
    "build_ocsp_responder_certificate",
    "build_server_certificate",
]


def _role_extension(role: OperatorRole) -> x509.Extension[x509.UnrecognizedExtension]:
    value = role.value.encode("ascii")
    return x509.Extension(
        OPERATOR_ROLE_OID,
        False,
        x509.UnrecognizedExtension(OPERATOR_ROLE_OID, bytes([UTF8STRING_TAG, len(value)]) + value),
    )


def _signing_hash(issuer_key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def build_ca_certificate(
    *,
    common_name: str,
    public_key: PublicKey,
    issuer_key: PrivateKey,
    issuer: x509.Certificate | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None,
) -> x509.Certificate:
    """A CA certificate: self-signed when ``issuer`` is None (the root)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certfleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    if issuer is not None:
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    return builder.sign(issuer_key, _signing_hash(issuer_key))


def _leaf_builder(
    *,
    subject_cn: str,
    public_key: PublicKey,
    issuer_cert: x509.Certificate,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int,
    eku: list[x509.ObjectIdentifier],
    key_usage_encipherment: bool,
) -> x509.CertificateBuilder:
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key_usage_encipherment), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )


class ClientCertificateTemplate:
    """Client certificates (device, service, operator) from one issuer, minted fast.

    The extensions every such certificate shares (basicConstraints, keyUsage, extKeyUsage,
    authorityKeyIdentifier) are DER-encoded once and kept as pre-encoded values, and the
    builder is made in one call with the whole extension list, so each certificate costs
    one signature and its own fields only. The DER produced is the same as with the
    extension objects added one by one (a test compares them).
    """

    def __init__(
        self,
        issuer_cert: x509.Certificate,
        issuer_key: PrivateKey,
        *,
        publish_url: str | None = None,
    ) -> None:
        self.issuer_cert = issuer_cert
        self.issuer_key = issuer_key
        self._issuer_name = issuer_cert.subject
        self._hash = _signing_hash(issuer_key)
        issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self._constant = {
            encipherment: [
                _pre_encoded(x509.BasicConstraints(ca=False, path_length=None), critical=True),
                _pre_encoded(_leaf_key_usage(encipherment), critical=True),
                _pre_encoded(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                ),
            ]
            for encipherment in (False, True)
        }
        # CRL Distribution Point, Freshest CRL (the delta) and AIA OCSP URL when the CA
        # publishes (ca init --publish-url).
        self._publication = [
            _pre_encoded(extension.value, critical=False)
            for extension in (leaf_publication_extensions(publish_url) if publish_url else [])
        ]
        self._aki = _pre_encoded(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
            critical=False,
        )

    def build(
        self,
        *,
        identity: Identity,
        public_key: PublicKey,
        not_before: dt.datetime,
        not_after: dt.datetime,
        serial: int | None = None,
        role: OperatorRole | None = None,
    ) -> x509.Certificate:
        """A client certificate (device, service, operator or claim): clientAuth, CN = name,
        one SPIFFE URI SAN; an operator's ``role`` in its extension."""
        public_key = check_public_key(public_key)
        if role is not None and identity.kind is not IdentityKind.OPERATOR:
            raise IdentityError(f"only an operator certificate carries a role, not {identity.uri}")
        not_before, not_after = naive_utc(not_before), naive_utc(not_after)
        if not_after <= not_before:
            raise IdentityError(
                f"not_after {not_after.isoformat()} is not after not_before "
                f"{not_before.isoformat()}"
            )
        serial_number = serial if serial is not None else new_serial()
        if not 0 < serial_number < 1 << 159:
            raise IdentityError("a certificate serial must be positive and at most 159 bits")
        extensions = [
            *self._constant[isinstance(public_key, rsa.RSAPublicKey)],
            x509.Extension(
                x509.SubjectKeyIdentifier.oid,
                False,
                x509.SubjectKeyIdentifier.from_public_key(public_key),
            ),
            self._aki,
            *self._publication,
            x509.Extension(
                x509.SubjectAlternativeName.oid,
                False,
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            ),
            *([_role_extension(role)] if role is not None else []),
        ]
        # The constructor takes the finished list; the chained setters would copy the
        # builder and re-check for duplicates once per extension.
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]),
            public_key=public_key,
            serial_number=serial_number,
            not_valid_before=not_before,
            not_valid_after=not_after,
            extensions=extensions,
        )
        return builder.sign(self.issuer_key, self._hash)


def _pre_encoded(
    extension: x509.ExtensionType, *, critical: bool
) -> x509.Extension[x509.UnrecognizedExtension]:
    return x509.Extension(
        extension.oid, critical, x509.UnrecognizedExtension(extension.oid, extension.public_bytes())
    )


def _leaf_key_usage(key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def build_leaf_certificate(
    *,
    identity: Identity,
    public_key: PublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int | None = None,
) -> x509.Certificate:
    """A device, service or operator client certificate (clientAuth, one SPIFFE URI SAN)."""
    return ClientCertificateTemplate(issuer_cert, issuer_key).build(
        identity=identity,
        public_key=public_key,
        not_before=not_before,
        not_after=not_after,
        serial=serial,
    )


def build_server_certificate(
    *,
    name: str,
    dns_names: list[str],
    ip_addresses: list[str],
    public_key: PublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    publish_url: str | None = None,
) -> x509.Certificate:
    """A TLS server certificate (serverAuth only) for the broker or the registry."""
    if not dns_names and not ip_addresses:
        raise IdentityError(f"server certificate {name!r} needs at least one --dns or --ip")
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise IdentityError(f"{ip!r} is not an IP address") from None
    builder = _leaf_builder(
        subject_cn=check_name(name, "server name"),
        public_key=check_public_key(public_key),
        issuer_cert=issuer_cert,
        not_before=not_before,
        not_after=not_after,
        serial=new_serial(),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        key_usage_encipherment=isinstance(public_key, rsa.RSAPublicKey),
    ).add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension in leaf_publication_extensions(publish_url) if publish_url else []:
        builder = builder.add_extension(extension.value, critical=False)
    return builder.sign(issuer_key, _signing_hash(issuer_key))


def build_ocsp_responder_certificate(
    *,
    name: str,
    public_key: PublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A delegated OCSP responder certificate (RFC 6960 4.2.2.2): OCSPSigning only, issued
    by the CA whose certificates it answers for, with id-pkix-ocsp-nocheck (a relying party
    does not ask about the responder itself)."""
    builder = _leaf_builder(
        subject_cn=check_name(name, "OCSP responder name"),
        public_key=check_public_key(public_key),
        issuer_cert=issuer_cert,
        not_before=not_before,
        not_after=not_after,
        serial=new_serial(),
        eku=[ExtendedKeyUsageOID.OCSP_SIGNING],
        key_usage_encipherment=False,
    ).add_extension(x509.OCSPNoCheck(), critical=False)
    return builder.sign(issuer_key, _signing_hash(issuer_key))
