"""Devices' last-seen time and last telemetry, written in batches by the MQTT ingest."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, or_, update
from sqlmodel import Session

from registry.db import write_transaction
from registry.models import Device

__all__ = ["TelemetryUpdate", "record_telemetry"]


@dataclass(frozen=True, slots=True)
class TelemetryUpdate:
    """The latest telemetry of one device, as the ingest batches it."""

    device_id: str
    seen_at: dt.datetime
    telemetry: dict[str, Any] = field(default_factory=dict)


def record_telemetry(session: Session, updates: Sequence[TelemetryUpdate]) -> int:
    """Batch-write last_seen_at / last_telemetry; keeps the newest when updates race.

    Unknown device ids are ignored. Returns the number of updates handed to the database.
    """
    latest: dict[str, TelemetryUpdate] = {}
    for item in updates:
        current = latest.get(item.device_id)
        if current is None or item.seen_at >= current.seen_at:
            latest[item.device_id] = item
    if not latest:
        return 0
    table = Device.__table__  # type: ignore[attr-defined]
    with write_transaction(session):
        session.execute(
            update(table)
            .where(
                table.c.device_id == bindparam("b_id"),
                or_(table.c.last_seen_at.is_(None), table.c.last_seen_at <= bindparam("b_seen")),
            )
            .values(last_seen_at=bindparam("b_seen"), last_telemetry=bindparam("b_telemetry")),
            [
                {"b_id": u.device_id, "b_seen": u.seen_at, "b_telemetry": u.telemetry}
                for u in latest.values()
            ],
        )
    return len(latest)
