"""Who gets in: identity from the client certificate, client id, revocation.

:class:`AdmissionPolicy` is the one place that decides; the listener asks it before amqtt
sees the CONNECT (so a refused client never touches another client's session), and
:class:`CertAuthPlugin` asks it again as amqtt's authentication plugin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from amqtt.contexts import BaseContext
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from factory.errors import IdentityError
from factory.profile import Identity, IdentityKind, read_identity, serial_hex

__all__ = ["Admission", "AdmissionPolicy", "CertAuthPlugin", "Refusal", "RefusedError"]

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
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    REVOKED = "revoked"
    DECOMMISSIONED = "decommissioned"
    CONNECT_TIMEOUT = "connect_timeout"
    BAD_CONNECT = "bad_connect"


class RefusedError(Exception):
    """A client is refused; ``reason`` is counted, ``detail`` is logged."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Admission:
    """A client let in: its identity and the serial it authenticated with."""

    identity: Identity
    serial: str


class RevocationView(Protocol):
    """What the policy needs to know about revocations (implemented by RevokedSet)."""

    def is_serial_revoked(self, serial: str) -> bool: ...

    def is_device_decommissioned(self, device_id: str) -> bool: ...


class AdmissionPolicy:
    """Decide whether a verified client certificate may connect with a given client id."""

    def __init__(self, trust_domain: str, revocations: RevocationView) -> None:
        self.trust_domain = trust_domain
        self.revocations = revocations

    def identify(self, certificate_der: bytes) -> Admission:
        """The identity and serial of a client certificate, or RefusedError."""
        try:
            certificate = x509.load_der_x509_certificate(certificate_der)
        except ValueError as exc:
            raise RefusedError(Refusal.BAD_IDENTITY, f"unparseable certificate: {exc}") from None
        serial = serial_hex(certificate.serial_number)
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
        return Admission(identity, serial)

    def admit(self, certificate_der: bytes, client_id: str | None) -> Admission:
        """Admission for ``client_id`` presenting ``certificate_der``, or RefusedError."""
        admission = self.identify(certificate_der)
        identity = admission.identity
        if client_id != identity.name:
            raise RefusedError(
                Refusal.CLIENT_ID_MISMATCH,
                f"client id {client_id!r} is not the certificate's {identity.kind.value} "
                f"id {identity.name!r}",
            )
        if self.revocations.is_serial_revoked(admission.serial):
            raise RefusedError(Refusal.REVOKED, f"serial={admission.serial} is revoked")
        if identity.kind is IdentityKind.DEVICE and self.revocations.is_device_decommissioned(
            identity.name
        ):
            raise RefusedError(
                Refusal.DECOMMISSIONED, f"device_id={identity.name} is decommissioned"
            )
        return admission


class CertAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt authentication plugin: the session's peer certificate must pass the policy.

    The policy object is attached after the broker is built (:meth:`bind`); an unbound
    plugin refuses everyone.
    """

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._policy: AdmissionPolicy | None = None
        self._on_authenticated: Callable[[Session], None] = lambda _session: None

    def bind(self, policy: AdmissionPolicy, on_authenticated: Callable[[Session], None]) -> None:
        """Attach the policy, and a hook told about every session let in."""
        self._policy = policy
        self._on_authenticated = on_authenticated

    async def authenticate(self, *, session: Session) -> bool | None:
        if self._policy is None or session.ssl_object is None:
            return False
        certificate_der = session.ssl_object.getpeercert(binary_form=True)
        if certificate_der is None:
            return False
        try:
            self._policy.admit(certificate_der, session.client_id)
        except RefusedError as exc:
            log.warning("client refused by auth plugin reason=%s %s", exc.reason, exc.detail)
            return False
        self._on_authenticated(session)
        return True
