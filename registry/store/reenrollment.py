"""Re-enrollment data: may this device get a new certificate from an operator, and record it.

A device whose certificates have all expired cannot renew over MQTT (the broker refuses the
handshake), so an operator re-enrolls it from a CSR made on the device. Only a registered,
active device with no live certificate that is still valid qualifies: one with a valid
certificate renews itself, and a decommissioned one stays out. The one exception is the
same request again: a valid certificate for the very key of the CSR is the answer to an
earlier re-enrollment whose answer was lost, and is handed out again (idempotent on device
and key), so a cut connection never leaves a device without its certificate.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from registry.db import write_transaction
from registry.errors import DecommissionedDeviceError, LiveCertificateError, NotFoundError
from registry.models import Certificate, Device
from registry.store.audit import Actor
from registry.store.renewals import StoredCertificate, add_certificate, newest_certificate

__all__ = [
    "ReenrollmentBasis",
    "certificate_key_der",
    "record_reenrollment",
    "reenrollment_basis",
]


@dataclass(frozen=True, slots=True)
class ReenrollmentBasis:
    """What a re-enrollment starts from: the device's newest certificate (None: it has
    none), or ``repeat``, the valid certificate already issued for this key."""

    previous: StoredCertificate | None
    repeat: StoredCertificate | None = None


def reenrollment_basis(
    session: Session, device_id: str, key_der: bytes, now: dt.datetime
) -> ReenrollmentBasis:
    """Check ``device_id`` may be re-enrolled with the key whose SubjectPublicKeyInfo is
    ``key_der`` (module doc): NotFoundError, DecommissionedDeviceError, LiveCertificateError."""
    repeat = _check(session, session.get(Device, device_id), device_id, key_der, now)
    if repeat is not None:
        return ReenrollmentBasis(None, repeat)
    return ReenrollmentBasis(newest_certificate(session, device_id))


def record_reenrollment(
    session: Session,
    issued: StoredCertificate,
    *,
    key_der: bytes,
    previous_serial: str | None,
    actor: Actor,
    now: dt.datetime,
) -> StoredCertificate:
    """Store ``issued`` as the device's live certificate with its audit entry, in one write
    transaction that first checks again under the device's row lock: a decommission or a
    re-enrollment committed since :func:`reenrollment_basis` wins (its error is raised and
    nothing is written; one for the same key returns that certificate instead)."""
    with write_transaction(session):
        device = session.exec(
            select(Device).where(Device.device_id == issued.device_id).with_for_update()
        ).one_or_none()
        repeat = _check(session, device, issued.device_id, key_der, now)
        if repeat is not None:
            return repeat
        add_certificate(session, issued, "reenroll", previous_serial=previous_serial, actor=actor)
    return issued


def _check(
    session: Session, device: Device | None, device_id: str, key_der: bytes, now: dt.datetime
) -> StoredCertificate | None:
    """Refuse what does not qualify; the valid certificate of this very key, if any."""
    if device is None:
        raise NotFoundError(
            f"device {device_id} is not registered; a new device is provisioned at the line "
            "(certfleet factory provision or sign-csr), not re-enrolled"
        )
    if device.status != "active":
        raise DecommissionedDeviceError(
            f"device {device_id} is decommissioned; it cannot be given new certificates"
        )
    valid = session.exec(
        select(Certificate)
        .where(
            Certificate.device_id == device_id,
            Certificate.status == "live",
            col(Certificate.not_after) > now,
        )
        .order_by(col(Certificate.not_after).desc())
    ).all()
    for certificate in valid:
        if certificate_key_der(certificate.certificate_pem) == key_der:
            return StoredCertificate.of(certificate)
    if valid:
        newest = valid[0]
        raise LiveCertificateError(
            f"device {device_id} has a live certificate (serial {newest.serial}) valid until "
            f"{newest.not_after:%Y-%m-%dT%H:%M:%SZ}: it renews itself over MQTT; re-enrollment "
            "is for a device whose certificates have all expired (decommission it if its key "
            "is lost)"
        )
    return None


def certificate_key_der(certificate_pem: str) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a stored certificate."""
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
