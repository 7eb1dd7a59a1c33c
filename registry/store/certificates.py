"""Certificates as relying parties ask about them: one serial's status (OCSP), the CRL's
entries, and the CRL's number."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlmodel import Session, col, select

from factory.ca import RevokedEntry
from fleetcore.reasons import DEFAULT_REASON_CODE, reason_flag
from registry.db import write_transaction
from registry.models import Certificate
from registry.store import counters

__all__ = [
    "CertificateStatusInfo",
    "certificate_status",
    "next_crl_number",
    "revoked_entries",
]


def revoked_entries(session: Session, now: dt.datetime) -> list[RevokedEntry]:
    """Revoked certificates that have not expired yet (expired ones need no CRL entry)."""
    rows = session.exec(
        select(Certificate.serial, Certificate.revoked_at, Certificate.revocation_reason)
        .where(Certificate.status == "revoked", col(Certificate.not_after) > now)
        .order_by(col(Certificate.serial))
    ).all()
    return [
        RevokedEntry(
            serial=int(serial, 16), revoked_at=revoked_at or now, reason=reason_flag(reason)
        )
        for serial, revoked_at, reason in rows
    ]


@dataclass(frozen=True, slots=True)
class CertificateStatusInfo:
    """What an OCSP responder needs of one serial: good or revoked, when and why."""

    serial: str
    device_id: str
    status: str
    revoked_at: dt.datetime | None
    reason_code: str | None


def certificate_status(session: Session, serial: str) -> CertificateStatusInfo | None:
    """The status of certificate ``serial`` (serial_hex form); None when it is not ours."""
    row = session.get(Certificate, serial)
    if row is None:
        return None
    return CertificateStatusInfo(
        row.serial,
        row.device_id,
        row.status,
        row.revoked_at,
        (row.revocation_reason or DEFAULT_REASON_CODE) if row.status == "revoked" else None,
    )


def next_crl_number(session: Session) -> int:
    """Allocate the next CRLNumber (monotonic across restarts and processes)."""
    with write_transaction(session):
        return counters.bump(session, counters.CRL_NUMBER)
