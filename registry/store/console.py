"""What the console's pages read, beyond what the rest of ``registry.store`` already answers.

Each function is one or two indexed queries, so a page stays fast at 100,000 devices.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from registry.models import AuditLog, Certificate, Revocation, Stats
from registry.store import stats

__all__ = [
    "EXPIRY_HORIZONS_DAYS",
    "AuditEntry",
    "DeviceHistory",
    "FleetOverview",
    "RevocationRow",
    "device_history",
    "fleet_overview",
]

EXPIRY_HORIZONS_DAYS = (7, 30, 90)
LATEST_REVOCATIONS = 10
AUDIT_ENTRIES = 50


@dataclass(frozen=True, slots=True)
class RevocationRow:
    seq: int
    device_id: str
    serials: list[str]
    reason: str
    reason_code: str
    revoked_at: dt.datetime
    operator: str


@dataclass(frozen=True, slots=True)
class FleetOverview:
    stats: Stats
    #: live certificates expiring within each of EXPIRY_HORIZONS_DAYS (not yet expired).
    expiring_within: dict[int, int]
    latest_revocations: list[RevocationRow]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: dt.datetime
    who: str
    action: str
    from_addr: str | None
    detail: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class DeviceHistory:
    #: why each revoked serial of the device was revoked.
    revocation_by_serial: dict[str, RevocationRow]
    audit: list[AuditEntry]


def _revocation_row(row: Revocation) -> RevocationRow:
    return RevocationRow(
        seq=row.seq,
        device_id=row.device_id,
        serials=list(row.serials),
        reason=row.reason,
        reason_code=row.reason_code,
        revoked_at=row.revoked_at,
        operator=row.operator,
    )


def fleet_overview(session: Session, now: dt.datetime) -> FleetOverview:
    """Counts by status, seen last minute and weekly expiries (``stats.stats``), expiring
    certificates per horizon, and the latest revocations."""
    expiring: dict[int, int] = {}
    for days in EXPIRY_HORIZONS_DAYS:
        expiring[days] = int(
            session.exec(
                select(func.count()).where(
                    Certificate.status == "live",
                    col(Certificate.not_after) >= now,
                    col(Certificate.not_after) < now + dt.timedelta(days=days),
                )
            ).one()
        )
    latest = session.exec(
        select(Revocation).order_by(col(Revocation.seq).desc()).limit(LATEST_REVOCATIONS)
    ).all()
    return FleetOverview(
        stats=stats.stats(session, now),
        expiring_within=expiring,
        latest_revocations=[_revocation_row(r) for r in latest],
    )


def device_history(session: Session, device_id: str) -> DeviceHistory:
    """The device's revocations (by serial) and its newest audit entries."""
    by_serial: dict[str, RevocationRow] = {}
    for row in session.exec(
        select(Revocation).where(Revocation.device_id == device_id).order_by(col(Revocation.seq))
    ).all():
        revocation = _revocation_row(row)
        for serial in revocation.serials:
            by_serial[serial] = revocation
    entries = session.exec(
        select(AuditLog)
        .where(AuditLog.target == device_id)
        .order_by(col(AuditLog.at).desc(), col(AuditLog.id).desc())
        .limit(AUDIT_ENTRIES)
    ).all()
    return DeviceHistory(
        revocation_by_serial=by_serial,
        audit=[AuditEntry(e.at, e.who, e.action, e.from_addr, e.detail) for e in entries],
    )
