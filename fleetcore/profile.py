"""The identity model: what a certfleet identity is (kind, name, trust domain, an operator's
role), the checks on names, keys and serials, and how an identity is read back out of a
certificate. Nobody else parses SANs by hand. The certificates themselves (CA, client, server,
OCSP responder) are built by :mod:`fleetcore.cert_builders`, to this profile.

Identities are SPIFFE URIs (DESIGN.md): ``spiffe://<trust-domain>/<kind>/<name>`` with kind
one of ``device``, ``service``, ``operator``, ``claim``. Every client certificate has the same
shape (clientAuth, CN = name, that one URI SAN); the kind says what it may do:

- ``device``: one device's identity (MQTT as itself, renewal, EST re-enrollment);
- ``service``, ``operator``: the fleet's services and the people running it;
- ``claim``: a bootstrap certificate for a production batch (``spiffe://<td>/claim/<batch>``).
  It names no device: it is accepted only by EST ``simpleenroll`` (first enrollment of a
  device the claim's allow-list names), and refused by the broker and every other route.

An operator certificate also carries its access role (:class:`OperatorRole`: viewer, operator,
admin) in a dedicated non-critical extension (:data:`OPERATOR_ROLE_OID`, a UTF8String), so
the name and the role travel together and other TLS stacks ignore it. An operator
certificate without one (issued before roles existed) is read as ``operator``.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import ssl
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetcore.errors import IdentityError

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_OPERATOR_ROLE",
    "ENROLLMENT_ONLY_KINDS",
    "HARDWARE_SERIAL_PATTERN",
    "OPERATOR_ROLE_OID",
    "NAME_PATTERN",
    "RESERVED_DEVICE_IDS",
    "TRUST_DOMAIN_PATTERN",
    "UTF8STRING_TAG",
    "Identity",
    "IdentityKind",
    "OperatorRole",
    "PrivateKey",
    "PublicKey",
    "certificate_pem",
    "check_device_id",
    "check_name",
    "check_public_key",
    "new_serial",
    "read_identity",
    "read_operator_role",
    "serial_hex",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

#: not_before is set this far in the past so devices with a slightly slow clock accept it.
CLOCK_SKEW = dt.timedelta(minutes=5)

#: Device ids, service and operator names: what is safe in a URI path, an MQTT topic level
#: and a file name alike.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Names a device id may not take (compared without case): the services of a fleet and the
#: words of our identity URIs. A device named like a service would share its MQTT client id
#: and take its broker session over (issue 11.7). Name a new service from this list.
RESERVED_DEVICE_IDS = frozenset(
    {
        "broker",
        "ca",
        "certfleet",
        "console",
        "device",
        "factory",
        "monitor",
        "ocsp",
        "operator",
        "probe",
        "registry",
        "service",
    }
)
#: Hardware serials: printable ASCII without spaces, what manufacturers print on a label.
HARDWARE_SERIAL_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
TRUST_DOMAIN_PATTERN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")

_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048


class IdentityKind(StrEnum):
    """What a certificate's holder is."""

    DEVICE = "device"
    SERVICE = "service"
    OPERATOR = "operator"
    #: a production batch's bootstrap certificate: first enrollment only, no device identity.
    CLAIM = "claim"


#: The identity kinds the broker, the REST API and renewal never admit.
ENROLLMENT_ONLY_KINDS = frozenset({IdentityKind.CLAIM})


class OperatorRole(StrEnum):
    """What an operator may do: each role may do what the ones before it may."""

    #: read: devices, audit, expiry, stats, the console's pages.
    VIEWER = "viewer"
    #: and act on devices: decommission, re-enroll, renew now, register.
    OPERATOR = "operator"
    #: and run the CA and the registry's access: tokens, roles, CA operations.
    ADMIN = "admin"

    def allows(self, needed: OperatorRole) -> bool:
        """Whether this role may do what ``needed`` may."""
        order = list(OperatorRole)
        return order.index(self) >= order.index(needed)

    @classmethod
    def parse(cls, value: str) -> OperatorRole:
        """The role named ``value``, or IdentityError listing the roles."""
        try:
            return cls(value)
        except ValueError:
            raise IdentityError(
                f"role {value!r} is not one of {', '.join(role.value for role in cls)}"
            ) from None


#: What an operator certificate or token without a role is: everything they could do before
#: roles existed. Narrow them by issuing a new certificate or token with a role.
DEFAULT_OPERATOR_ROLE = OperatorRole.OPERATOR
#: The operator-role extension: an OID under the UUID arc (X.667, no registration needed).
OPERATOR_ROLE_OID = x509.ObjectIdentifier("2.25.301953863843281746986871593418950117633")
#: The DER tag of the role extension's value (a UTF8String).
UTF8STRING_TAG = 0x0C


def read_operator_role(certificate: x509.Certificate) -> OperatorRole:
    """The role an operator certificate carries; :data:`DEFAULT_OPERATOR_ROLE` when it carries
    none. IdentityError for a malformed or unknown role (never a guess)."""
    try:
        extension = certificate.extensions.get_extension_for_oid(OPERATOR_ROLE_OID)
    except x509.ExtensionNotFound:
        return DEFAULT_OPERATOR_ROLE
    value = extension.value
    der = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    if len(der) < 2 or der[0] != UTF8STRING_TAG or der[1] != len(der) - 2:
        raise IdentityError("the certificate's operator role extension is malformed")
    return OperatorRole.parse(der[2:].decode("utf-8", errors="replace"))


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid device id / service / operator name, else raise."""
    if not NAME_PATTERN.fullmatch(name):
        raise IdentityError(
            f"{what} {name!r} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid device id and no service's name, else raise."""
    check_name(device_id, "device id")
    if device_id.lower() in RESERVED_DEVICE_IDS:
        raise IdentityError(
            f"device id {device_id!r} is reserved for a service "
            f"(reserved: {', '.join(sorted(RESERVED_DEVICE_IDS))}); choose another id"
        )
    return device_id


@dataclass(frozen=True, slots=True)
class Identity:
    """A certfleet identity: ``spiffe://<trust_domain>/<kind>/<name>``."""

    trust_domain: str
    kind: IdentityKind
    name: str

    def __post_init__(self) -> None:
        if not TRUST_DOMAIN_PATTERN.fullmatch(self.trust_domain):
            raise IdentityError(
                f"trust domain {self.trust_domain!r} is not a lower-case DNS-like name"
            )
        if self.kind is IdentityKind.DEVICE:
            check_device_id(self.name)
        else:
            check_name(self.name, f"{self.kind.value} name")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind.value}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse a SPIFFE URI into an identity, or raise IdentityError."""
        match = re.fullmatch(r"spiffe://([^/]+)/([a-z]+)/([^/]+)", uri)
        if match is None:
            raise IdentityError(f"{uri!r} is not of the form spiffe://<domain>/<kind>/<name>")
        domain, kind, name = match.groups()
        try:
            identity_kind = IdentityKind(kind)
        except ValueError:
            raise IdentityError(
                f"{uri!r} names kind {kind!r}; expected device, service, operator or claim"
            ) from None
        return cls(domain, identity_kind, name)

    @classmethod
    def device(cls, trust_domain: str, device_id: str) -> Identity:
        return cls(trust_domain, IdentityKind.DEVICE, device_id)

    @classmethod
    def claim(cls, trust_domain: str, batch: str) -> Identity:
        """The identity of production batch ``batch``'s claim (bootstrap) certificate."""
        return cls(trust_domain, IdentityKind.CLAIM, batch)

    def __str__(self) -> str:
        return self.uri


def new_serial() -> int:
    """A random positive 159-bit serial (RFC 5280 allows up to 20 octets)."""
    return secrets.randbits(159) | (1 << 158)


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """The certificate as PEM; the same bytes as ``public_bytes(PEM)``, in a third of the time
    (the standard library's encoder, from DER)."""
    return ssl.DER_cert_to_PEM_cert(certificate.public_bytes(Encoding.DER)).encode("ascii")


def serial_hex(serial: int) -> str:
    """The serial as the registry, feed and broker write it: lower-case hex, no separators."""
    return format(serial, "x")


def check_public_key(public_key: object) -> PublicKey:
    """Accept P-256/P-384, Ed25519 and RSA >= 2048; raise IdentityError for anything else."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _ALLOWED_CURVES):
            raise IdentityError(
                f"EC curve {public_key.curve.name} is not supported; use P-256 or P-384"
            )
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MIN_RSA_BITS:
            raise IdentityError(
                f"RSA key of {public_key.key_size} bits is too weak; use 2048 bits or more"
            )
        return public_key
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    raise IdentityError(
        f"key type {type(public_key).__name__} is not supported; use EC P-256, Ed25519 or RSA"
    )


def read_identity(certificate: x509.Certificate) -> Identity:
    """The one certfleet identity a client certificate carries.

    Raises IdentityError for: a CA certificate, a certificate without clientAuth, no URI SAN,
    more than one URI SAN, a URI that is not a certfleet SPIFFE id, or a device certificate
    whose CN differs from its device id.
    """
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise IdentityError("a CA certificate cannot be used as a client identity")
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no extendedKeyUsage; clientAuth is required") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise IdentityError("certificate is not for client authentication (no clientAuth)")
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no subjectAltName with an identity URI") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(
            f"certificate carries {len(uris)} identity URIs; exactly one is required"
        )
    identity = Identity.parse(uris[0])
    if identity.kind is IdentityKind.DEVICE:
        cns = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != identity.name:
            raise IdentityError(
                f"device certificate CN does not match its device id {identity.name!r}"
            )
    return identity
