"""Devices: registration (idempotent, all or nothing per batch), listing and reading one."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleetcore.clock import utcnow
from fleetcore.profile import NAME_PATTERN
from registry.certs import ParsedCertificate
from registry.db import write_transaction
from registry.errors import ConflictError, InvalidRequestError, NotFoundError
from registry.models import (
    BatchResult,
    Certificate,
    CertificatePublic,
    Device,
    DeviceList,
    DevicePublic,
    DeviceSummary,
)
from registry.store.audit import Actor, add_entry

__all__ = [
    "Registration",
    "decode_cursor",
    "device_public",
    "encode_cursor",
    "get_device",
    "list_devices",
    "register_devices",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Registration:
    """One parsed certificate to register, with the hardware serial it came with."""

    certificate: ParsedCertificate
    hardware_serial: str | None = None


def register_devices(
    session: Session, registrations: Sequence[Registration], actor: Actor
) -> BatchResult:
    """Register certificates (and their devices) in one transaction; idempotent.

    A certificate already registered for the same device counts as ``existing``. A serial
    or hardware serial bound to another device, or a new certificate for a decommissioned
    device, is a ConflictError and nothing of the batch is written. On PostgreSQL two
    writers inserting the same new device can race to the unique constraint: the loser
    retries once and then sees the winner's rows.
    """
    try:
        with write_transaction(session):
            return _register(session, registrations, actor)
    except IntegrityError:
        log.info("registration raced a concurrent insert, retrying count=%d", len(registrations))
    with write_transaction(session):
        return _register(session, registrations, actor)


@dataclass(slots=True)
class _Known:
    """What the database already holds about a batch (updated as the batch is planned)."""

    cert_owner: dict[str, str]  # serial -> device id
    devices: dict[str, tuple[str, str | None]]  # device id -> (status, hardware serial)
    hardware_owner: dict[str, str]  # hardware serial -> device id


@dataclass(slots=True)
class _Plan:
    """The rows a batch writes."""

    new_devices: list[dict[str, Any]] = field(default_factory=list)
    new_certificates: list[dict[str, Any]] = field(default_factory=list)
    hardware_updates: list[dict[str, Any]] = field(default_factory=list)
    existing: int = 0


def _register(session: Session, registrations: Sequence[Registration], actor: Actor) -> BatchResult:
    known = _load_known(session, registrations)
    plan = _Plan()
    now = utcnow()
    for index, registration in enumerate(registrations):
        _plan_one(known, plan, index, registration, now)
    _write(session, plan, registrations, actor)
    return BatchResult(created=len(plan.new_certificates), existing=plan.existing)


def _load_known(session: Session, registrations: Sequence[Registration]) -> _Known:
    """The owners of the batch's serials and hardware serials, and its known devices."""
    serials = list({r.certificate.serial for r in registrations})
    device_ids = list({r.certificate.device_id for r in registrations})
    hardware_serials = list({r.hardware_serial for r in registrations if r.hardware_serial})

    cert_owner: dict[str, str] = dict(
        session.exec(
            select(Certificate.serial, Certificate.device_id).where(
                col(Certificate.serial).in_(serials)
            )
        ).all()
    )
    devices: dict[str, tuple[str, str | None]] = {
        device_id: (status, hardware_serial)
        for device_id, status, hardware_serial in session.exec(
            select(Device.device_id, Device.status, Device.hardware_serial)
            .where(col(Device.device_id).in_(device_ids))
            # FOR SHARE (PostgreSQL): a concurrent decommission of one of these devices
            # either finishes first (we then see it decommissioned) or waits for us (and then
            # revokes the certificate we add). SQLite's BEGIN IMMEDIATE already serializes.
            .with_for_update(read=True)
        ).all()
    }
    hardware_owner: dict[str, str] = {}
    if hardware_serials:
        for hardware_serial, device_id in session.exec(
            select(Device.hardware_serial, Device.device_id).where(
                col(Device.hardware_serial).in_(hardware_serials)
            )
        ).all():
            if hardware_serial is not None:
                hardware_owner[hardware_serial] = device_id
    return _Known(cert_owner, devices, hardware_owner)


def _plan_one(
    known: _Known, plan: _Plan, index: int, registration: Registration, now: dt.datetime
) -> None:
    """Check one registration against what is known (ConflictError) and plan its rows."""
    parsed = registration.certificate
    where = f"devices[{index}] (device {parsed.device_id}, serial {parsed.serial})"
    hardware_serial = registration.hardware_serial
    if hardware_serial is not None:
        owner = known.hardware_owner.get(hardware_serial)
        if owner is not None and owner != parsed.device_id:
            raise ConflictError(
                f"{where}: hardware serial {hardware_serial!r} is already bound to device {owner}"
            )
    device = known.devices.get(parsed.device_id)
    if device is not None and hardware_serial is not None:
        known_hardware = device[1]
        if known_hardware is not None and known_hardware != hardware_serial:
            raise ConflictError(
                f"{where}: device is registered with hardware serial {known_hardware!r}, "
                f"not {hardware_serial!r}"
            )
    owner_of_serial = known.cert_owner.get(parsed.serial)
    if owner_of_serial is not None:
        if owner_of_serial != parsed.device_id:
            raise ConflictError(
                f"{where}: serial is already registered to device {owner_of_serial}"
            )
        plan.existing += 1
    elif device is not None and device[0] == "decommissioned":
        raise ConflictError(
            f"{where}: device is decommissioned; it cannot be given new certificates"
        )
    else:
        known.cert_owner[parsed.serial] = parsed.device_id
        plan.new_certificates.append(
            {
                "serial": parsed.serial,
                "device_id": parsed.device_id,
                "not_before": parsed.not_before,
                "not_after": parsed.not_after,
                "status": "live",
                "revoked_at": None,
                "certificate_pem": parsed.certificate_pem,
            }
        )
    if device is None:
        known.devices[parsed.device_id] = ("active", hardware_serial)
        plan.new_devices.append(
            {
                "device_id": parsed.device_id,
                "status": "active",
                "hardware_serial": hardware_serial,
                "created_at": now,
            }
        )
    elif device[1] is None and hardware_serial is not None:
        known.devices[parsed.device_id] = (device[0], hardware_serial)
        plan.hardware_updates.append({"b_id": parsed.device_id, "b_hw": hardware_serial})
    if hardware_serial is not None:
        known.hardware_owner[hardware_serial] = parsed.device_id


def _write(
    session: Session, plan: _Plan, registrations: Sequence[Registration], actor: Actor
) -> None:
    """Insert the planned devices and certificates, bind hardware serials, audit the batch."""
    if plan.new_devices:
        session.execute(Device.__table__.insert(), plan.new_devices)  # type: ignore[attr-defined]
    if plan.hardware_updates:
        table = Device.__table__  # type: ignore[attr-defined]
        session.execute(
            update(table)
            .where(table.c.device_id == bindparam("b_id"))
            .values(hardware_serial=bindparam("b_hw")),
            plan.hardware_updates,
        )
    if plan.new_certificates:
        session.execute(Certificate.__table__.insert(), plan.new_certificates)  # type: ignore[attr-defined]
    if plan.new_certificates or plan.hardware_updates:
        add_entry(
            session,
            actor,
            "register",
            plan.new_certificates[0]["device_id"]
            if len(registrations) == 1 and plan.new_certificates
            else f"{len(registrations)} devices",
            {"created": len(plan.new_certificates), "existing": plan.existing},
        )


def _summary(device: Device) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "status": device.status,
        "hardware_serial": device.hardware_serial,
        "created_at": device.created_at,
        "decommissioned_at": device.decommissioned_at,
        "last_seen_at": device.last_seen_at,
        "last_telemetry": device.last_telemetry,
    }


def device_public(session: Session, device: Device) -> DevicePublic:
    certificates = session.exec(
        select(Certificate)
        .where(Certificate.device_id == device.device_id)
        .order_by(col(Certificate.not_before), col(Certificate.serial))
    ).all()
    return DevicePublic(
        **_summary(device),
        certificates=[
            CertificatePublic(
                serial=c.serial,
                not_before=c.not_before,
                not_after=c.not_after,
                status=c.status,  # type: ignore[arg-type]
                revoked_at=c.revoked_at,
                revocation_reason=c.revocation_reason,  # type: ignore[arg-type]
            )
            for c in certificates
        ],
    )


def get_device(session: Session, device_id: str) -> DevicePublic:
    """A device with its certificates; NotFoundError when it is not registered."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id} is not registered")
    return device_public(session, device)


def encode_cursor(device_id: str) -> str:
    """The page cursor after ``device_id`` (opaque to clients)."""
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The device id of a cursor this registry handed out; InvalidRequestError otherwise."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        device_id = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        decoded = device_id.decode("utf-8")
        if not NAME_PATTERN.fullmatch(decoded):
            raise ValueError(decoded)
        return decoded
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidRequestError(
            "cursor is not one this registry handed out; pass next_cursor back unchanged"
        ) from None


def list_devices(
    session: Session,
    *,
    status: str | None = None,
    expiring_before: dt.datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
    id_prefix: str | None = None,
) -> DeviceList:
    """One page of devices ordered by id (keyset pagination: ``cursor`` = last id seen).

    ``id_prefix`` keeps the ids starting with it, as an index range: ids are made of
    characters below ``~`` (NAME_PATTERN), so ``[prefix, prefix + "~")`` holds exactly them
    in a byte-ordered collation (SQLite's, and PostgreSQL's C / C.UTF-8).
    """
    statement = select(Device).order_by(col(Device.device_id)).limit(limit + 1)
    if status is not None:
        statement = statement.where(Device.status == status)
    if id_prefix:
        statement = statement.where(
            col(Device.device_id) >= id_prefix, col(Device.device_id) < id_prefix + "~"
        )
    if cursor:
        statement = statement.where(col(Device.device_id) > decode_cursor(cursor))
    if expiring_before is not None:
        # An uncorrelated IN: the (status, not_after) index finds the expiring certificates
        # once, instead of a probe per device.
        expiring = select(Certificate.device_id).where(
            Certificate.status == "live", col(Certificate.not_after) < expiring_before
        )
        statement = statement.where(col(Device.device_id).in_(expiring))
    rows = session.exec(statement).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].device_id) if len(rows) > limit else None
    return DeviceList(
        devices=[DeviceSummary(**_summary(d)) for d in page],
        next_cursor=next_cursor,
    )


def active_device_ids(session: Session, device_ids: Iterable[str]) -> set[str]:
    """Which of ``device_ids`` are registered and active."""
    return set(
        session.exec(
            select(Device.device_id)
            .where(col(Device.device_id).in_(list(device_ids)))
            .where(col(Device.status) == "active")
        ).all()
    )
