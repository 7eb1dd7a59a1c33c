"""Who gets in: identity from the client certificate, client id, revocation.

:class:`AdmissionPolicy` is the one place that decides; the CONNECT gate
(:mod:`broker.gate`) asks it before amqtt sees the CONNECT (so a refused client never
touches another client's session), and amqtt's authentication plugin
(:class:`broker.amqtt_adapter.GateAuthPlugin`) asks it again. Nothing here depends on amqtt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import CONNACK_NOT_AUTHORIZED, RefusedError
from broker.sessions import service_instance, session_key
from fleetcore.errors import IdentityError
from fleetcore.profile import (
    ENROLLMENT_ONLY_KINDS,
    Identity,
    IdentityKind,
    read_identity,
    serial_hex,
)

__all__ = [
    "CONNACK_IDENTIFIER_REJECTED",
    "CONNACK_NOT_AUTHORIZED",
    "CONNACK_UNACCEPTABLE_PROTOCOL",
    "Admission",
    "AdmissionPolicy",
    "ClientIdMode",
    "Refusal",
    "RefusedError",
]

#: CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3) the gate answers with.
CONNACK_UNACCEPTABLE_PROTOCOL = 0x01
CONNACK_IDENTIFIER_REJECTED = 0x02

log = logging.getLogger(__name__)


class Refusal(StrEnum):
    """Why a client was refused; the value is the ``reason`` label of the refusal metric."""

    # In the TLS handshake
    NO_CERTIFICATE = "no_certificate"
    SELF_SIGNED = "self_signed"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    NOT_CLIENT_CERTIFICATE = "not_client_certificate"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TLS_ERROR = "tls_error"
    # At CONNECT (CONNACK 0x05 "not authorized", then close)
    CA_CERTIFICATE = "ca_certificate"
    BAD_IDENTITY = "bad_identity"
    FOREIGN_TRUST_DOMAIN = "foreign_trust_domain"
    OPERATOR = "operator"
    CLAIM = "claim"  # a batch's bootstrap certificate: EST first enrollment only
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    EMPTY_CLIENT_ID = "empty_client_id"  # CONNACK 0x02: empty id with clean session off
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # CONNACK 0x01: not MQTT 3.1.1
    WILL_REFUSED = "will_refused"  # the will topic fails the publish ACL
    REVOKED = "revoked"
    DECOMMISSIONED = "decommissioned"
    CONNECT_TIMEOUT = "connect_timeout"
    BAD_CONNECT = "bad_connect"


class ClientIdMode(StrEnum):
    """How the MQTT client id relates to the certificate (``CERTFLEET_BROKER_CLIENT_ID``)."""

    #: The client id must be the certificate's id (an empty one, with clean session, gets it).
    STRICT = "strict"
    #: Whatever the client sends is replaced by the certificate's id (EMQX's
    #: ``peer_cert_as_clientid``).
    FROM_CERTIFICATE = "from-certificate"


@dataclass(frozen=True, slots=True)
class Admission:
    """A client let in: its identity, the serial it authenticated with, and the client id
    amqtt gets for it (:mod:`broker.sessions`)."""

    identity: Identity
    serial: str
    session_key: str


class RevocationView(Protocol):
    """What the policy needs to know about revocations (implemented by RevokedSet)."""

    def is_serial_revoked(self, serial: str) -> bool: ...

    def is_device_decommissioned(self, device_id: str) -> bool: ...


def _authority_key_id(certificate: x509.Certificate) -> str | None:
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier.hex() if aki.key_identifier is not None else None


class AdmissionPolicy:
    """Decide whether a verified client certificate may connect with a given client id."""

    def __init__(
        self,
        trust_domain: str,
        revocations: RevocationView,
        client_id_mode: ClientIdMode = ClientIdMode.STRICT,
    ) -> None:
        self.trust_domain = trust_domain
        self.revocations = revocations
        self.client_id_mode = client_id_mode
        #: key ids of issuing CAs revoked by the root (``certfleet ca revoke-issuing``): every
        #: certificate they signed is refused, registered or not (:mod:`broker.issuers`).
        self.revoked_issuers: frozenset[str] = frozenset()

    def identify(self, certificate_der: bytes) -> Admission:
        """The identity and serial of a client certificate, or RefusedError."""
        try:
            certificate = x509.load_der_x509_certificate(certificate_der)
        except ValueError as exc:
            raise RefusedError(Refusal.BAD_IDENTITY, f"unparseable certificate: {exc}") from None
        serial = serial_hex(certificate.serial_number)
        if self.revoked_issuers and _authority_key_id(certificate) in self.revoked_issuers:
            raise RefusedError(
                Refusal.REVOKED, f"serial={serial} was issued by a revoked issuing CA"
            )
        # Classify the two profile violations that have their own counted reason; everything
        # else about the identity is read_identity's call.
        try:
            constraints = certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
            if constraints.ca:
                raise RefusedError(
                    Refusal.CA_CERTIFICATE, f"CA certificate serial={serial} used as a client"
                )
        except x509.ExtensionNotFound:
            pass
        try:
            eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise RefusedError(
                Refusal.NOT_CLIENT_CERTIFICATE, f"certificate serial={serial} has no clientAuth"
            )
        try:
            identity = read_identity(certificate)
        except IdentityError as exc:
            raise RefusedError(Refusal.BAD_IDENTITY, f"serial={serial} {exc}") from None
        if identity.trust_domain != self.trust_domain:
            raise RefusedError(
                Refusal.FOREIGN_TRUST_DOMAIN,
                f"identity {identity.uri} is outside trust domain {self.trust_domain}",
            )
        if identity.kind is IdentityKind.OPERATOR:
            raise RefusedError(
                Refusal.OPERATOR, f"operator identity {identity.uri} cannot connect to MQTT"
            )
        if identity.kind in ENROLLMENT_ONLY_KINDS:
            raise RefusedError(
                Refusal.CLAIM,
                f"claim certificate {identity.uri} serial={serial} is for first enrollment "
                "(EST simpleenroll) only; a device connects with the certificate it enrolled",
            )
        return Admission(identity, serial, session_key(identity))

    def admit(
        self, certificate_der: bytes, client_id: str | None, *, clean_session: bool = True
    ) -> Admission:
        """Admission for ``client_id`` presenting ``certificate_der``, or RefusedError.

        ``client_id`` None (or empty) is a CONNECT with a zero-length client id.
        """
        admission = self.identify(certificate_der)
        identity = admission.identity
        instance = self._check_client_id(identity, client_id or None, clean_session)
        if instance is not None:
            admission = Admission(identity, admission.serial, session_key(identity, instance))
        if self.revocations.is_serial_revoked(admission.serial):
            raise RefusedError(Refusal.REVOKED, f"serial={admission.serial} is revoked")
        if identity.kind is IdentityKind.DEVICE and self.revocations.is_device_decommissioned(
            identity.name
        ):
            raise RefusedError(
                Refusal.DECOMMISSIONED, f"device_id={identity.name} is decommissioned"
            )
        return admission

    def _check_client_id(
        self, identity: Identity, client_id: str | None, clean: bool
    ) -> str | None:
        """Refuse a client id the mode does not allow; return a service's instance name."""
        accepted, instance = False, None
        if client_id is not None:
            if identity.kind is IdentityKind.SERVICE:
                accepted, instance = service_instance(identity, client_id)
            else:
                accepted = client_id == identity.name
        if self.client_id_mode is ClientIdMode.FROM_CERTIFICATE:
            return instance if accepted else None
        if client_id is None:
            if clean:
                return None  # [MQTT-3.1.3-6]: the server assigns one, the certificate's
            raise RefusedError(
                Refusal.EMPTY_CLIENT_ID,
                f"empty client id with clean session off certificate_id={identity.name}",
                connack=CONNACK_IDENTIFIER_REJECTED,  # [MQTT-3.1.3-8]
            )
        if not accepted:
            raise RefusedError(
                Refusal.CLIENT_ID_MISMATCH,
                f"client_id={client_id[:100]!r} certificate_id={identity.name!r} "
                f"kind={identity.kind.value} (the client id must be the certificate's id)",
            )
        return instance
