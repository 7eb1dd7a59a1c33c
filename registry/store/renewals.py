"""Renewal's data: the per-device rate limit (the ``renewal_limit`` table, shared by every
registry process) and recording a renewed certificate.

Two rules live here, because they must hold across processes and restarts:

- at most N requests per device per interval (:func:`count_attempt`, row-locked);
- one renewal per device per interval; a re-delivered CSR (same key) within it gets the
  certificate already issued for it (:func:`renewal_basis`, and again under the write lock
  in :func:`record_renewal`);
- one answer per request although every replica receives it (:func:`claim_request`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from registry.db import insert_ignore, write_transaction
from registry.errors import DecommissionedDeviceError, NotFoundError, RenewedTooSoonError
from registry.models import Certificate, Device, RenewalClaim, RenewalLimit
from registry.store.audit import Actor, add_entry

__all__ = [
    "CLAIM_RETENTION",
    "CLAIM_TTL",
    "SHARED_CLAIM_TAKE_OVER",
    "RenewalBasis",
    "RenewalWindow",
    "StoredCertificate",
    "add_certificate",
    "certificate_audit_detail",
    "certificate_row",
    "claim_request",
    "count_attempt",
    "newest_certificate",
    "record_renewal",
    "renewal_basis",
]


#: A claim another replica holds is left to it this long; after that (it died before it
#: answered) a re-delivered request is taken over.
CLAIM_TTL = dt.timedelta(seconds=30)
#: Through a shared group each delivery reaches one replica, so a request whose claim another
#: replica took more than this long ago is the device's retry (its answer was lost), not the
#: same delivery racing: the replica that got it answers (the same certificate, ``repeated``).
SHARED_CLAIM_TAKE_OVER = dt.timedelta(seconds=1)
#: A device's claims older than this are deleted when it next asks.
CLAIM_RETENTION = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    """A device certificate as stored (plain values: usable after its session closed)."""

    device_id: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    certificate_pem: str
    #: the certificate itself when it was just signed (spares parsing the PEM again).
    certificate: x509.Certificate | None = field(default=None, compare=False, repr=False)

    def loaded(self) -> x509.Certificate:
        """The certificate as an object (parsed from the PEM unless it was just signed)."""
        if self.certificate is not None:
            return self.certificate
        return x509.load_pem_x509_certificate(self.certificate_pem.encode())

    @classmethod
    def of(cls, row: Certificate) -> StoredCertificate:
        return cls(row.device_id, row.serial, row.not_before, row.not_after, row.certificate_pem)


@dataclass(frozen=True, slots=True)
class RenewalWindow:
    """A device's requests in its current rate-limit window."""

    attempts: int
    window_start: dt.datetime


@dataclass(frozen=True, slots=True)
class RenewalBasis:
    """What a renewal starts from: the device's newest certificate (None when it has none),
    and the certificate to send again when this CSR's key was renewed within the interval."""

    previous: StoredCertificate | None
    repeat: StoredCertificate | None


def claim_request(
    session: Session,
    device_id: str,
    payload: bytes,
    instance: str,
    now: dt.datetime,
    take_over_after: dt.timedelta = CLAIM_TTL,
) -> bool:
    """Claim the answer to one renewal request for replica ``instance``; commits.

    True: this replica answers (it inserted the claim first, or holds it already: a
    re-delivery, or the claim of another replica is older than ``take_over_after``). False:
    another replica claimed it and answers; stay silent.
    """
    digest = hashlib.sha256(payload).hexdigest()
    fingerprint = hashlib.sha256(f"{device_id}\n{digest}".encode()).hexdigest()
    table = RenewalClaim.__table__  # type: ignore[attr-defined]
    with write_transaction(session):
        session.execute(
            delete(table).where(
                table.c.device_id == device_id, table.c.claimed_at < now - CLAIM_RETENTION
            )
        )
        values = {
            "fingerprint": fingerprint,
            "device_id": device_id,
            "instance": instance,
            "claimed_at": now,
        }
        if insert_ignore(session, table, values):
            return True
        taken = session.execute(
            update(table)
            .where(
                table.c.fingerprint == fingerprint,
                (table.c.instance == instance) | (table.c.claimed_at < now - take_over_after),
            )
            .values(instance=instance, claimed_at=now)
        )
        return bool(taken.rowcount)  # type: ignore[attr-defined]


def count_attempt(
    session: Session, device_id: str, now: dt.datetime, interval: dt.timedelta
) -> RenewalWindow:
    """Count one request of ``device_id`` in its window (a new window once ``interval``
    passed), under the row's lock; commits. The row is created first if missing (ON
    CONFLICT DO NOTHING), so two replicas counting at once both lock the same row."""
    table = RenewalLimit.__table__  # type: ignore[attr-defined]
    with write_transaction(session):
        insert_ignore(session, table, {"device_id": device_id, "window_start": now, "attempts": 0})
        row = _limit_row(session, device_id)
        assert row is not None
        if now - row.window_start >= interval:
            row.window_start, row.attempts = now, 0
        row.attempts += 1
        window = RenewalWindow(row.attempts, row.window_start)
        session.add(row)
    return window


def renewal_basis(
    session: Session, device_id: str, key_sha256: str, now: dt.datetime, interval: dt.timedelta
) -> RenewalBasis:
    """Check ``device_id`` may be renewed now with this key (NotFoundError,
    DecommissionedDeviceError, RenewedTooSoonError) and return what the renewal starts from."""
    _check_active(session.get(Device, device_id), device_id)
    repeat = _repeat(session, session.get(RenewalLimit, device_id), key_sha256, now, interval)
    return RenewalBasis(newest_certificate(session, device_id), repeat)


def newest_certificate(session: Session, device_id: str) -> StoredCertificate | None:
    """The device's certificate with the latest not_after (None: it has none)."""
    newest = session.exec(
        select(Certificate)
        .where(Certificate.device_id == device_id)
        .order_by(col(Certificate.not_after).desc())
        .limit(1)
    ).first()
    return None if newest is None else StoredCertificate.of(newest)


def record_renewal(
    session: Session,
    renewed: StoredCertificate,
    *,
    previous_serial: str | None,
    key_sha256: str,
    actor: Actor,
    now: dt.datetime,
    interval: dt.timedelta,
) -> StoredCertificate:
    """Store ``renewed`` as a live certificate with its audit entry and rate-limit record,
    in one write transaction that first re-checks, under the device's row lock, that the
    device is still active and not renewed meanwhile: a decommission that committed since
    :func:`renewal_basis` wins (DecommissionedDeviceError), and so does a renewal another
    registry process just made (its certificate is returned when it was for this key)."""
    with write_transaction(session):
        device = session.exec(
            select(Device).where(Device.device_id == renewed.device_id).with_for_update()
        ).one_or_none()
        _check_active(device, renewed.device_id)
        row = _limit_row(session, renewed.device_id)
        if row is not None:
            repeat = _repeat(session, row, key_sha256, now, interval)
            if repeat is not None:
                return repeat
        else:
            row = RenewalLimit(device_id=renewed.device_id, window_start=now, attempts=0)
        row.issued_at = now
        row.issued_serial = renewed.serial
        row.issued_key_sha256 = key_sha256
        session.add(row)
        add_certificate(session, renewed, "renew", previous_serial=previous_serial, actor=actor)
    return renewed


def add_certificate(
    session: Session,
    certificate: StoredCertificate,
    action: str,
    *,
    previous_serial: str | None,
    actor: Actor,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add a device's new live certificate and its audit entry (``action``: how it came;
    ``detail``: more for the entry, e.g. the claim a device enrolled with)."""
    session.add(Certificate(**certificate_row(certificate)))
    add_entry(
        session,
        actor,
        action,
        certificate.device_id,
        certificate_audit_detail(certificate, previous_serial, detail),
    )


def certificate_row(certificate: StoredCertificate) -> dict[str, Any]:
    """The column values of a new live certificate (an ORM row or a Core INSERT)."""
    return {
        "serial": certificate.serial,
        "device_id": certificate.device_id,
        "not_before": certificate.not_before,
        "not_after": certificate.not_after,
        "status": "live",
        "revoked_at": None,
        "certificate_pem": certificate.certificate_pem,
    }


def certificate_audit_detail(
    certificate: StoredCertificate, previous_serial: str | None, detail: dict[str, Any] | None
) -> dict[str, Any]:
    """The audit detail of a new certificate (serial, previous serial, not_after, more)."""
    return {
        "serial": certificate.serial,
        "previous_serial": previous_serial,
        "not_after": certificate.not_after.isoformat(),
        **(detail or {}),
    }


def _limit_row(session: Session, device_id: str) -> RenewalLimit | None:
    return session.exec(
        select(RenewalLimit).where(RenewalLimit.device_id == device_id).with_for_update()
    ).one_or_none()


def _check_active(device: Device | None, device_id: str) -> None:
    if device is None:
        raise NotFoundError(f"device {device_id} is not registered; register it before renewing")
    if device.status != "active":
        raise DecommissionedDeviceError(
            f"device {device_id} is decommissioned; it cannot be given new certificates"
        )


def _repeat(
    session: Session,
    row: RenewalLimit | None,
    key_sha256: str,
    now: dt.datetime,
    interval: dt.timedelta,
) -> StoredCertificate | None:
    """The certificate to send again for a re-delivered CSR, None to go ahead, or
    RenewedTooSoonError. A zero interval turns the rule off."""
    if interval <= dt.timedelta(0) or row is None:
        return None
    if row.issued_at is None or row.issued_serial is None:
        return None
    since = now - row.issued_at
    if since >= interval:
        return None
    if row.issued_key_sha256 == key_sha256:
        certificate = session.get(Certificate, row.issued_serial)
        if certificate is not None:
            return StoredCertificate.of(certificate)
    raise RenewedTooSoonError(
        f"device {row.device_id} was renewed {since.total_seconds():.0f} s ago",
        since.total_seconds(),
    )
