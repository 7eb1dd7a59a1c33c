"""Claims and enrollment secrets: recording them, and the first enrollment of a device with
one, in one write transaction each (module doc of :mod:`registry.est.models`).

The quota holds under concurrency on SQLite and PostgreSQL alike: the claim's ``enrolled``
is raised by one conditional UPDATE (``enrolled < quota`` and the claim neither revoked nor
expired) in the transaction that registers the device; a transaction that fails after it
(the device enrolled meanwhile) rolls the count back with it. A one-time secret is spent
the same way (``used_at IS NULL``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, func, insert, or_, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleetcore.clock import utcnow
from registry.db import write_connection, write_transaction
from registry.errors import ConflictError, DecommissionedDeviceError, NotFoundError
from registry.est.errors import AlreadyEnrolledError, ClaimQuotaError, EnrollmentRefusedError
from registry.est.models import (
    Claim,
    ClaimAllow,
    ClaimPublic,
    ClaimRegistration,
    EnrollmentSecret,
)
from registry.models import AuditLog, Certificate, Device
from registry.store.audit import Actor, add_entry, entry_row
from registry.store.reenrollment import certificate_key_der
from registry.store.renewals import (
    StoredCertificate,
    add_certificate,
    certificate_audit_detail,
    certificate_row,
)

__all__ = [
    "SECRET_PREFIX",
    "ClaimState",
    "SecretState",
    "active_claim",
    "create_secret",
    "find_secret",
    "get_claim",
    "list_claims",
    "record_claim",
    "record_claim_enrollment",
    "record_secret_enrollment",
    "resolve_allowed",
    "revoke_claim",
]

SECRET_PREFIX = "cfe_"  # noqa: S105  (a marker prefix, not a secret)


#: Core tables of the enrollment's hot path (plain statements, no ORM unit of work).
_CLAIM: Any = Claim.__table__  # type: ignore[attr-defined]
_ALLOW: Any = ClaimAllow.__table__  # type: ignore[attr-defined]
_DEVICE: Any = Device.__table__  # type: ignore[attr-defined]
_CERTIFICATE: Any = Certificate.__table__  # type: ignore[attr-defined]
_AUDIT: Any = AuditLog.__table__  # type: ignore[attr-defined]
#: What the enrollment reads of a claim (not its certificate).
_CLAIM_STATE = (
    _CLAIM.c.serial,
    _CLAIM.c.quota,
    _CLAIM.c.enrolled,
    _CLAIM.c.allow_any,
    _CLAIM.c.expires_at,
    _CLAIM.c.revoked_at,
    _CLAIM.c.webhook_url,
)


# The hot path's statements, built once (each execution only binds its values).
_SELECT_CLAIM = core_select(*_CLAIM_STATE).where(_CLAIM.c.batch == bindparam("q_batch"))
_ALLOW_ENTRY = core_select(_ALLOW.c.device_id, _ALLOW.c.hardware_serial)
_SELECT_ALLOW_BY_SERIAL = _ALLOW_ENTRY.where(
    _ALLOW.c.batch == bindparam("q_batch"), _ALLOW.c.hardware_serial == bindparam("q_serial")
)
_SELECT_ALLOW_BY_ID = _ALLOW_ENTRY.where(
    _ALLOW.c.batch == bindparam("q_batch"), _ALLOW.c.device_id == bindparam("q_device")
)
_SELECT_ALLOW_BY_EITHER = _ALLOW_ENTRY.where(
    _ALLOW.c.batch == bindparam("q_batch"),
    or_(
        _ALLOW.c.hardware_serial == bindparam("q_serial"),
        _ALLOW.c.device_id == bindparam("q_device"),
    ),
)
_INSERT_DEVICE = insert(_DEVICE)
_SPEND_QUOTA = (
    update(_CLAIM)
    .where(
        _CLAIM.c.batch == bindparam("q_batch"),
        _CLAIM.c.enrolled < _CLAIM.c.quota,
        _CLAIM.c.revoked_at.is_(None),
        _CLAIM.c.expires_at > bindparam("q_now"),
    )
    .values(enrolled=_CLAIM.c.enrolled + 1)
)
_MARK_ALLOWED = (
    update(_ALLOW)
    .where(_ALLOW.c.batch == bindparam("q_batch"), _ALLOW.c.device_id == bindparam("q_device"))
    .values(enrolled_at=bindparam("q_now"))
)
_INSERT_CERTIFICATE = insert(_CERTIFICATE)
_INSERT_AUDIT = insert(_AUDIT)


@dataclass(frozen=True, slots=True)
class ClaimState:
    """A claim that may enroll now (as read; the enrollment's transaction checks again);
    ``webhook_url``: the claim's own pre-enrollment webhook, if it has one."""

    batch: str
    allow_any: bool
    webhook_url: str | None = None


@dataclass(frozen=True, slots=True)
class SecretState:
    id: int
    device_id: str


# -- claims --------------------------------------------------------------------------------


def record_claim(session: Session, registration: ClaimRegistration, actor: Actor) -> bool:
    """Record a claim and its allow-list; True when new, False when this very claim (same
    batch and serial) is recorded already. ConflictError for a batch with another claim."""
    now = utcnow()
    with write_transaction(session):
        existing = session.get(Claim, registration.batch)
        if existing is not None:
            if existing.serial == registration.serial:
                return False
            raise ConflictError(
                f"batch {registration.batch} has a claim already (serial {existing.serial}); "
                "revoke it and name the new batch differently"
            )
        session.add(
            Claim(
                batch=registration.batch,
                serial=registration.serial,
                quota=registration.quota,
                allow_any=not registration.allow,
                expires_at=registration.expires_at,
                created_at=now,
                certificate_pem=registration.certificate_pem,
                webhook_url=registration.webhook_url,
            )
        )
        session.flush()
        if registration.allow:
            session.execute(
                insert(ClaimAllow),
                [
                    {
                        "batch": registration.batch,
                        "device_id": entry.device_id,
                        "hardware_serial": entry.hardware_serial,
                    }
                    for entry in registration.allow
                ],
            )
        add_entry(
            session,
            actor,
            "claim_create",
            f"claim/{registration.batch}",
            {
                "serial": registration.serial,
                "quota": registration.quota,
                "expires_at": registration.expires_at.isoformat(),
                "allow": len(registration.allow),
                "webhook": registration.webhook_url is not None,
            },
        )
    return True


def revoke_claim(session: Session, batch: str, reason: str, actor: Actor) -> ClaimPublic:
    """Revoke a claim: nobody enrolls with it from now on (devices enrolled stay)."""
    with write_transaction(session):
        claim = session.exec(
            select(Claim).where(Claim.batch == batch).with_for_update()
        ).one_or_none()
        if claim is None:
            raise NotFoundError(f"no claim for batch {batch}")
        if claim.revoked_at is None:
            claim.revoked_at = utcnow()
            session.add(claim)
            add_entry(session, actor, "claim_revoke", f"claim/{batch}", {"reason": reason})
    return get_claim(session, batch)


def get_claim(session: Session, batch: str) -> ClaimPublic:
    claim = session.get(Claim, batch)
    if claim is None:
        raise NotFoundError(f"no claim for batch {batch}")
    allow_count = session.exec(
        select(func.count()).select_from(ClaimAllow).where(ClaimAllow.batch == batch)
    ).one()
    return ClaimPublic(
        batch=claim.batch,
        serial=claim.serial,
        quota=claim.quota,
        enrolled=claim.enrolled,
        allow_any=claim.allow_any,
        allow_count=int(allow_count),
        expires_at=claim.expires_at,
        created_at=claim.created_at,
        revoked_at=claim.revoked_at,
        webhook_url=claim.webhook_url,
    )


def list_claims(session: Session) -> list[ClaimPublic]:
    batches = session.exec(select(Claim.batch).order_by(col(Claim.batch))).all()
    return [get_claim(session, batch) for batch in batches]


def _refusal(claim: Any, batch: str, now: dt.datetime) -> EnrollmentRefusedError:
    """Why ``claim`` (a claim row, or None) enrolls nobody now (unknown, revoked, expired,
    quota used up)."""
    if claim is None:
        return EnrollmentRefusedError(f"claim {batch} is not recorded in this registry")
    if claim.revoked_at is not None:
        return EnrollmentRefusedError(
            f"claim {batch} was revoked at {claim.revoked_at:%Y-%m-%dT%H:%M:%SZ}; it enrolls nobody"
        )
    if claim.expires_at <= now:
        return EnrollmentRefusedError(
            f"claim {batch} expired at {claim.expires_at:%Y-%m-%dT%H:%M:%SZ}; ask for a new claim"
        )
    return ClaimQuotaError(
        f"claim {batch} has enrolled {claim.enrolled} of its quota of {claim.quota} devices; "
        "no more enroll with it"
    )


def _claim_row(connection: Connection, batch: str) -> Any:
    return connection.execute(_SELECT_CLAIM, {"q_batch": batch}).first()


def active_claim(connection: Connection, batch: str, serial: str, now: dt.datetime) -> ClaimState:
    """The claim of ``batch`` presented with certificate ``serial``, if it may enroll now;
    EnrollmentRefusedError (or ClaimQuotaError) otherwise. One plain SELECT."""
    claim = _claim_row(connection, batch)
    if claim is not None and claim.serial != serial:
        raise EnrollmentRefusedError(
            f"claim certificate serial {serial} is not batch {batch}'s recorded claim"
        )
    if (
        claim is None
        or claim.revoked_at is not None
        or claim.expires_at <= now
        or claim.enrolled >= claim.quota
    ):
        raise _refusal(claim, batch, now)
    return ClaimState(batch, bool(claim.allow_any), claim.webhook_url)


def resolve_allowed(
    connection: Connection, claim: ClaimState, device_id: str | None, hardware_serial: str | None
) -> tuple[str, str | None]:
    """The device id (and hardware serial) claim ``claim`` gives a CSR asking for
    ``device_id`` and/or ``hardware_serial``: an allow-list entry, looked up by what the CSR
    asks (by serial first, then by id; one SELECT); EnrollmentRefusedError when the list
    names neither (or binds them differently)."""
    if claim.allow_any:
        if device_id is None:
            raise EnrollmentRefusedError(
                f"claim {claim.batch} has no allow-list: the CSR must name the device id (CN)"
            )
        return device_id, hardware_serial
    statement = (
        _SELECT_ALLOW_BY_EITHER
        if hardware_serial is not None and device_id is not None
        else _SELECT_ALLOW_BY_SERIAL
        if hardware_serial is not None
        else _SELECT_ALLOW_BY_ID
    )
    rows = (
        connection.execute(
            statement,
            {"q_batch": claim.batch, "q_serial": hardware_serial, "q_device": device_id},
        ).all()
        if hardware_serial is not None or device_id is not None
        else []
    )
    by_serial = [
        row
        for row in rows
        if hardware_serial is not None and row.hardware_serial == hardware_serial
    ]
    entry = by_serial[0] if by_serial else (rows[0] if rows else None)
    asked = " / ".join(
        part
        for part in (
            f"device id {device_id}" if device_id else "",
            f"hardware serial {hardware_serial}" if hardware_serial else "",
        )
        if part
    )
    if entry is None:
        raise EnrollmentRefusedError(
            f"{asked or 'a CSR naming nobody'} is not on claim {claim.batch}'s allow-list"
        )
    if device_id is not None and device_id != entry.device_id:
        raise EnrollmentRefusedError(
            f"the CSR asks for {asked}, but claim {claim.batch}'s allow-list binds that "
            f"hardware serial to device {entry.device_id}"
        )
    if hardware_serial is not None and entry.hardware_serial not in (None, hardware_serial):
        raise EnrollmentRefusedError(
            f"the CSR asks for {asked}, but claim {claim.batch}'s allow-list binds device "
            f"{entry.device_id} to another hardware serial"
        )
    return entry.device_id, entry.hardware_serial or hardware_serial


def _repeat(
    session: Session, device_id: str, key_der: bytes, now: dt.datetime
) -> StoredCertificate:
    """For a device enrolled already: its valid certificate for this very key (the answer
    to a request whose answer was lost), else AlreadyEnrolledError / a decommission."""
    device = session.get(Device, device_id)
    assert device is not None
    if device.status != "active":
        raise DecommissionedDeviceError(
            f"device {device_id} is decommissioned; it cannot be enrolled again"
        )
    for certificate in session.exec(
        select(Certificate).where(
            Certificate.device_id == device_id,
            Certificate.status == "live",
            col(Certificate.not_after) > now,
        )
    ).all():
        if certificate_key_der(certificate.certificate_pem) == key_der:
            return StoredCertificate.of(certificate)
    raise AlreadyEnrolledError(
        f"device {device_id} is enrolled already; it re-enrolls with its own certificate "
        "(EST simplereenroll), or an operator re-enrolls it"
    )


def _add_device(
    session: Session,
    issued: StoredCertificate,
    hardware_serial: str | None,
    actor: Actor,
    now: dt.datetime,
    detail: dict[str, str],
) -> None:
    _refuse_serial_owned(session, hardware_serial)
    session.add(
        Device(
            device_id=issued.device_id,
            status="active",
            hardware_serial=hardware_serial,
            created_at=now,
        )
    )
    session.flush()
    add_certificate(session, issued, "enroll", previous_serial=None, actor=actor, detail=detail)


def record_claim_enrollment(
    engine: Engine,
    batch: str,
    issued: StoredCertificate,
    *,
    hardware_serial: str | None,
    key_der: bytes,
    actor: Actor,
    now: dt.datetime,
    allow_listed: bool,
) -> StoredCertificate:
    """Register ``issued``'s device as enrolled with claim ``batch``: the device added, the
    quota spent, the allow-list entry marked (``allow_listed``), the certificate added with
    an audit entry naming the claim; one write transaction of plain statements, nothing read
    back. A device id or hardware serial taken already fails the device's INSERT (the
    quota is not touched): the same key again then gets the certificate it got."""
    device_id = issued.device_id
    try:
        with write_connection(engine) as connection:
            connection.execute(
                _INSERT_DEVICE,
                {
                    "device_id": device_id,
                    "status": "active",
                    "hardware_serial": hardware_serial,
                    "created_at": now,
                },
            )
            keys = {"q_batch": batch, "q_device": device_id, "q_now": now}
            if not connection.execute(_SPEND_QUOTA, keys).rowcount:
                raise _refusal(_claim_row(connection, batch), batch, now)
            if allow_listed:
                connection.execute(_MARK_ALLOWED, keys)
            connection.execute(_INSERT_CERTIFICATE, certificate_row(issued))
            detail = certificate_audit_detail(issued, None, {"claim": batch})
            connection.execute(_INSERT_AUDIT, entry_row(actor, "enroll", device_id, detail))
    except IntegrityError:
        with Session(engine) as session:
            return _taken(session, device_id, hardware_serial, key_der, now)
    return issued


def _taken(
    session: Session, device_id: str, hardware_serial: str | None, key_der: bytes, now: dt.datetime
) -> StoredCertificate:
    """After a device's INSERT failed: the device's certificate for this key (a lost
    answer asked again), or why it cannot enroll."""
    if session.get(Device, device_id) is not None:
        return _repeat(session, device_id, key_der, now)
    _refuse_serial_owned(session, hardware_serial)
    raise AlreadyEnrolledError(
        f"device {device_id} (or hardware serial {hardware_serial}) was enrolled by a "
        "concurrent request; retry to see the outcome"
    )


# -- one-time enrollment secrets -------------------------------------------------------------


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_secret(session: Session, device_id: str, lifetime: dt.timedelta, actor: Actor) -> str:
    """A one-time enrollment secret for ``device_id`` (not registered yet); returned once,
    only its hash is stored."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(24)
    now = utcnow()
    with write_transaction(session):
        if session.get(Device, device_id) is not None:
            raise ConflictError(
                f"device {device_id} is registered already; a registered device re-enrolls "
                "with its certificate (EST simplereenroll) or an operator's reenroll"
            )
        session.add(
            EnrollmentSecret(
                secret_sha256=_secret_hash(secret),
                device_id=device_id,
                created_at=now,
                expires_at=now + lifetime,
                created_by=actor.who[:256],
            )
        )
        add_entry(
            session,
            actor,
            "enrollment_secret_create",
            device_id,
            {"expires_at": (now + lifetime).isoformat()},
        )
    return secret


def find_secret(session: Session, device_id: str, secret: str, now: dt.datetime) -> SecretState:
    """The unused, unexpired secret ``secret`` of ``device_id``; EnrollmentRefusedError
    otherwise (one message for unknown and wrong device: nothing to probe with)."""
    row = session.exec(
        select(EnrollmentSecret).where(EnrollmentSecret.secret_sha256 == _secret_hash(secret))
    ).one_or_none()
    if row is None or row.device_id != device_id or row.id is None:
        raise EnrollmentRefusedError(
            f"no enrollment secret for device {device_id} matches; ask an operator for one "
            "(certfleet registry enrollment-secret create)"
        )
    if row.used_at is not None:
        raise EnrollmentRefusedError(
            f"the enrollment secret of device {device_id} was used at "
            f"{row.used_at:%Y-%m-%dT%H:%M:%SZ}; it is good for one enrollment"
        )
    if row.expires_at <= now:
        raise EnrollmentRefusedError(
            f"the enrollment secret of device {device_id} expired at "
            f"{row.expires_at:%Y-%m-%dT%H:%M:%SZ}"
        )
    return SecretState(row.id, row.device_id)


def record_secret_enrollment(
    session: Session,
    secret: SecretState,
    issued: StoredCertificate,
    *,
    hardware_serial: str | None,
    key_der: bytes,
    actor: Actor,
    now: dt.datetime,
) -> StoredCertificate:
    """Spend the secret and register its device with ``issued`` (one write transaction);
    the same key again returns the certificate it got."""
    try:
        with write_transaction(session):
            if session.get(Device, secret.device_id) is not None:
                return _repeat(session, secret.device_id, key_der, now)
            table = EnrollmentSecret.__table__  # type: ignore[attr-defined]
            spent = session.execute(
                update(table)
                .where(
                    table.c.id == secret.id,
                    table.c.used_at.is_(None),
                    table.c.expires_at > now,
                )
                .values(used_at=now)
            )
            if not spent.rowcount:  # type: ignore[attr-defined]
                raise EnrollmentRefusedError(
                    f"the enrollment secret of device {secret.device_id} was used or expired "
                    "meanwhile; it is good for one enrollment"
                )
            _add_device(
                session, issued, hardware_serial, actor, now, {"credential": "enrollment_secret"}
            )
    except IntegrityError:
        raise AlreadyEnrolledError(
            f"device {secret.device_id} was enrolled by a concurrent request; retry"
        ) from None
    return issued


def _refuse_serial_owned(session: Session, hardware_serial: str | None) -> None:
    """AlreadyEnrolledError when another device holds ``hardware_serial``."""
    if hardware_serial is None:
        return
    owner = session.exec(
        select(Device.device_id).where(Device.hardware_serial == hardware_serial)
    ).first()
    if owner is not None:
        raise AlreadyEnrolledError(
            f"hardware serial {hardware_serial} belongs to device {owner} already"
        )
