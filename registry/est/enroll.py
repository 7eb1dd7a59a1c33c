"""EST enrollment: who may enroll, and the one way each kind of enrollment is recorded.

- ``simpleenroll`` with a **claim certificate** (TLS client auth): the claim must be recorded,
  unrevoked, unexpired and under its quota; the CSR proves possession of its key and asks
  for a device id and/or hardware serial, which the claim's allow-list must name (the
  identity issued is the list's entry, never the CSR's word alone).
- ``simpleenroll`` with a **one-time enrollment secret** (HTTP Basic: the device id and the
  secret): the device id is the secret's; a CSR naming another device is refused.
- ``simplereenroll`` with the **device's current certificate** (TLS client auth): the renewal
  rules of :class:`registry.renewal.CertificateRenewer` (one home: attempts counted in the
  database, one renewal per interval, the stagger kept, the older certificate revoked as
  superseded once the new one is confirmed), identity unchanged.

Every issued certificate gets the device profile and the renewal's validity policy
(:func:`registry.renewal.sign_next`), and an audit entry (``enroll`` naming the claim or the
secret, ``renew`` for a re-enrollment).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from factory.csr import EnrollmentCSR, ValidatedCSR, load_csr, validate_enrollment_csr
from factory.errors import CSRError
from fleetcore.clock import utcnow
from fleetcore.errors import IdentityError
from fleetcore.profile import Identity, read_identity, serial_hex
from fleetcore.renewal_wire import RefusalCode
from registry.errors import DecommissionedDeviceError, RegistryError, UnavailableError
from registry.est.errors import (
    EnrollmentRefusedError,
    EstBadRequestError,
    EstRateLimitedError,
    EstUnauthorizedError,
)
from registry.issuer_revocations import IssuerRevocations
from registry.models import Certificate, Device
from registry.renewal import CertificateRenewer, RenewalRefused, sign_next
from registry.state import RegistryState
from registry.store import claims
from registry.store.audit import Actor
from registry.store.renewals import StoredCertificate

__all__ = [
    "ClaimEnrollment",
    "Enrolled",
    "check_claim_enrollment",
    "client_identity",
    "enroll_with_secret",
    "issue_claim_enrollment",
    "reenroll",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Enrolled:
    """An issued certificate (``repeated``: the one issued before for the same key)."""

    certificate: x509.Certificate
    device_id: str
    serial: str
    repeated: bool


def client_identity(
    der: bytes, trust_domain: str, revoked_issuers: IssuerRevocations
) -> tuple[Identity, x509.Certificate]:
    """The identity of a verified TLS client certificate; EnrollmentRefusedError otherwise,
    EstUnauthorizedError when its issuing CA was revoked (a claim certificate too: a claim
    is made again under the current issuing CA)."""
    certificate = x509.load_der_x509_certificate(der)
    try:
        identity = read_identity(certificate)
    except IdentityError as exc:
        raise EnrollmentRefusedError(f"client certificate refused: {exc}") from None
    if identity.trust_domain != trust_domain:
        raise EnrollmentRefusedError(f"{identity.uri} is outside trust domain {trust_domain}")
    revoked = revoked_issuers.revocation_of(certificate)
    if revoked is not None:
        raise EstUnauthorizedError(
            f"client certificate {identity.uri} refused: its {revoked.describe()}"
        )
    return identity, certificate


def _csr(csr_der: bytes, trust_domain: str) -> EnrollmentCSR:
    try:
        return validate_enrollment_csr(load_csr(csr_der), trust_domain)
    except CSRError as exc:
        raise EstBadRequestError(f"CSR refused: {exc}") from None


def _key_der(csr: EnrollmentCSR) -> bytes:
    return csr.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _sign(state: RegistryState, device_id: str, csr: EnrollmentCSR) -> StoredCertificate:
    validated = ValidatedCSR(Identity.device(state.ca.trust_domain, device_id), csr.public_key)
    return sign_next(
        state.ca,
        validated,
        None,
        lifetime=state.settings.renewal_lifetime,
        stagger=state.settings.renewal_stagger,
    )


def _enrolled(stored: StoredCertificate, issued: StoredCertificate) -> Enrolled:
    return Enrolled(
        stored.loaded(),
        stored.device_id,
        stored.serial,
        repeated=stored is not issued,
    )


@dataclass(frozen=True, slots=True)
class ClaimEnrollment:
    """A claim enrollment its claim and allow-list let through, not yet issued."""

    batch: str
    claim_serial: str
    claim_uri: str
    device_id: str
    hardware_serial: str | None
    csr: EnrollmentCSR
    #: the device is on the claim's allow-list (its entry is marked enrolled).
    allow_listed: bool = False
    #: the claim's own pre-enrollment webhook, asked before it is issued.
    webhook_url: str | None = None


def check_claim_enrollment(
    state: RegistryState, claim_certificate: x509.Certificate, csr_der: bytes
) -> ClaimEnrollment:
    """The claim's checks of a first enrollment (recorded, unrevoked, unexpired, under its
    quota; the CSR valid; the device on its allow-list); EnrollmentRefusedError or
    EstBadRequestError otherwise."""
    identity = read_identity(claim_certificate)
    batch, serial = identity.name, serial_hex(claim_certificate.serial_number)
    csr = _csr(csr_der, state.ca.trust_domain)
    with state.engine.connect() as connection:  # one connection, plain SELECTs, for both
        claim = claims.active_claim(connection, batch, serial, utcnow())
        device_id, hardware_serial = claims.resolve_allowed(
            connection, claim, csr.device_id, csr.hardware_serial
        )
    return ClaimEnrollment(
        batch,
        serial,
        identity.uri,
        device_id,
        hardware_serial,
        csr,
        allow_listed=not claim.allow_any,
        webhook_url=claim.webhook_url,
    )


def issue_claim_enrollment(
    state: RegistryState, checked: ClaimEnrollment, from_addr: str | None
) -> Enrolled:
    """Sign and record an enrollment :func:`check_claim_enrollment` let through (the quota
    spent in the recording transaction, which checks the claim again)."""
    issued = _sign(state, checked.device_id, checked.csr)
    stored = claims.record_claim_enrollment(
        state.engine,
        checked.batch,
        issued,
        hardware_serial=checked.hardware_serial,
        key_der=_key_der(checked.csr),
        actor=Actor(checked.claim_uri, from_addr),
        now=utcnow(),
        allow_listed=checked.allow_listed,
    )
    enrolled = _enrolled(stored, issued)
    _log("claim " + checked.batch, enrolled, checked.hardware_serial)
    return enrolled


def enroll_with_secret(
    state: RegistryState, device_id: str, secret: str, csr_der: bytes, from_addr: str | None
) -> Enrolled:
    """First enrollment authenticated by a one-time enrollment secret (module doc)."""
    with Session(state.engine) as session:
        bound = claims.find_secret(session, device_id, secret, utcnow())
    csr = _csr(csr_der, state.ca.trust_domain)
    if csr.device_id is not None and csr.device_id != bound.device_id:
        raise EnrollmentRefusedError(
            f"the CSR names device {csr.device_id}, but the enrollment secret is bound to "
            f"device {bound.device_id}"
        )
    issued = _sign(state, bound.device_id, csr)
    with Session(state.engine) as session:
        stored = claims.record_secret_enrollment(
            session,
            bound,
            issued,
            hardware_serial=csr.hardware_serial,
            key_der=_key_der(csr),
            actor=Actor(f"enrollment-secret:device/{bound.device_id}", from_addr),
            now=utcnow(),
        )
    enrolled = _enrolled(stored, issued)
    _log("enrollment secret", enrolled, csr.hardware_serial)
    return enrolled


def _check_current(state: RegistryState, device_id: str, serial: str) -> None:
    """The presented device certificate must be registered and live, its device active."""
    with Session(state.engine) as session:
        device = session.get(Device, device_id)
        certificate = session.get(Certificate, serial)
    if device is None or certificate is None or certificate.device_id != device_id:
        raise EnrollmentRefusedError(
            f"certificate serial {serial} of device {device_id} is not registered here"
        )
    if device.status != "active":
        raise DecommissionedDeviceError(
            f"device {device_id} is decommissioned; it cannot be re-enrolled"
        )
    if certificate.status != "live":
        raise EnrollmentRefusedError(
            f"certificate serial {serial} of device {device_id} is revoked "
            f"({certificate.revocation_reason or 'revoked'}); re-enroll with a live certificate"
        )


def _renewal_error(renewer: CertificateRenewer, refusal: RenewalRefused) -> RegistryError:
    if refusal.error is RefusalCode.RATE_LIMITED:
        return EstRateLimitedError(str(refusal), retry_after_s=math.ceil(renewer.min_interval_s))
    if refusal.error is RefusalCode.DEVICE_DECOMMISSIONED:
        return DecommissionedDeviceError(str(refusal))
    if refusal.error in (RefusalCode.INVALID_CSR, RefusalCode.TOO_LARGE):
        return EstBadRequestError(str(refusal))
    if refusal.error in (RefusalCode.BUSY, RefusalCode.REGISTRY_UNAVAILABLE):
        return UnavailableError(str(refusal))
    return EnrollmentRefusedError(str(refusal))


def reenroll(
    state: RegistryState,
    renewer: CertificateRenewer,
    identity: Identity,
    certificate: x509.Certificate,
    csr_der: bytes,
) -> Enrolled:
    """Re-enrollment authenticated by the device's current certificate (module doc)."""
    device_id, serial = identity.name, serial_hex(certificate.serial_number)
    _check_current(state, device_id, serial)
    try:
        renewer.count_attempt(device_id)  # before the CSR's checks: bad CSRs count too
        csr = _csr(csr_der, state.ca.trust_domain)
        if csr.device_id is not None and csr.device_id != device_id:
            raise EnrollmentRefusedError(
                f"the CSR names device {csr.device_id}, but the client certificate is device "
                f"{device_id}'s; a device re-enrolls only itself, identity unchanged"
            )
        renewed = renewer.renew_validated(
            ValidatedCSR(Identity.device(state.ca.trust_domain, device_id), csr.public_key)
        )
    except RenewalRefused as refusal:
        raise _renewal_error(renewer, refusal) from None
    enrolled = Enrolled(
        x509.load_pem_x509_certificate(renewed.certificate_pem.encode()),
        device_id,
        renewed.serial,
        renewed.repeated,
    )
    log.info(
        "est reenrolled device_id=%s serial=%s previous_serial=%s repeated=%s not_after=%s",
        device_id,
        renewed.serial,
        serial,
        renewed.repeated,
        renewed.not_after.isoformat(),
    )
    return enrolled


def _log(via: str, enrolled: Enrolled, hardware_serial: str | None) -> None:
    log.info(
        "est enrolled device_id=%s serial=%s via=%s hardware_serial=%s repeated=%s",
        enrolled.device_id,
        enrolled.serial,
        via,
        hardware_serial or "-",
        enrolled.repeated,
    )
