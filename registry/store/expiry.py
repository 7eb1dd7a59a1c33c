"""The fleet's expiry, read live from the registry's database (not the factory's manifest).
The data layer of ``GET /api/v1/expiry`` and of the expiry gauges
(:class:`registry.metrics.ExpiryCollector`).

A device's *current* certificate is its live certificate that expires last (a renewed
device's new one). Over the current certificates of active devices, with aggregate SQL
(one GROUP BY per device, summed in the database: no per-row Python):

- :func:`expiry_counts`: how many expire within 7, 30 and 90 days, how many active devices
  have no valid certificate (none live, or the current one expired), the next expiry. The
  Prometheus gauges (:class:`ExpiryCollector`) are these numbers, named in cert-manager's
  style (``certmanager_certificate_expiration_timestamp_seconds``);
- :func:`expiry_report`: the same in disjoint buckets (expired, <7d, <30d, <90d, later), a
  histogram of not_after over time, and the expired and soonest-expiring devices: what
  ``GET /api/v1/expiry`` answers and ``certfleet registry expiry-report`` prints.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Integer, and_, case, cast, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col

from registry.models import (
    Certificate,
    Device,
    ExpiringDevice,
    ExpiryReport,
    HistogramBin,
)
from registry.store.issuers import issuer_use

__all__ = ["LIST_LIMIT", "WINDOWS", "ExpiryCounts", "expiry_counts", "expiry_report"]

#: The "expiring within" windows of the gauges and the report's buckets, shortest first.
WINDOWS: Final[tuple[tuple[str, dt.timedelta], ...]] = (
    ("7d", dt.timedelta(days=7)),
    ("30d", dt.timedelta(days=30)),
    ("90d", dt.timedelta(days=90)),
)
HISTOGRAM_BINS: Final = 40
LIST_LIMIT: Final = 100


def _aware(value: Any) -> dt.datetime | None:
    # Aggregates over a subquery may come back naive (SQLite) or as text.
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _current() -> Any:
    """(device_id, expires) of every active device: the latest not_after of its live
    certificates, NULL when it has none."""
    # The status test inside the aggregate, not in the join: with it in the ON clause
    # SQLite's planner probes the (status, not_after) index per device, scanning every
    # live certificate of the fleet for each (1.5 s at 2,000 devices instead of ms).
    live_not_after = case((col(Certificate.status) == "live", col(Certificate.not_after)))
    expires = func.max(live_not_after).label("expires")
    return (
        select(col(Device.device_id).label("device_id"), expires)
        .select_from(Device)
        .outerjoin(Certificate, col(Certificate.device_id) == Device.device_id)
        .where(col(Device.status) == "active")
        .group_by(col(Device.device_id))
        .subquery("current")
    )


def _count_if(condition: ColumnElement[bool]) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


@dataclass(frozen=True, slots=True)
class ExpiryCounts:
    """What the gauges show (``within`` counts are cumulative, expired ones excluded)."""

    active_devices: int
    without_valid_certificate: int
    #: window label -> current certificates expiring within it (not yet expired)
    within: dict[str, int]
    next_expiry: dt.datetime | None


def expiry_counts(session: Session, now: dt.datetime) -> ExpiryCounts:
    """The gauges' numbers in one aggregate statement."""
    current = _current()
    expires = current.c.expires
    valid = expires > now
    row = session.execute(
        select(
            func.count(),
            _count_if(or_(expires.is_(None), expires <= now)),
            *[_count_if(and_(valid, expires <= now + window)) for _, window in WINDOWS],
            func.min(case((valid, expires))),
        ).select_from(current)
    ).one()
    values = tuple(row)
    return ExpiryCounts(
        active_devices=int(values[0]),
        without_valid_certificate=int(values[1]),
        within={label: int(n) for (label, _), n in zip(WINDOWS, values[2:-1], strict=True)},
        next_expiry=_aware(values[-1]),
    )


def _epoch_seconds(session: Session, value: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", value)
    return (func.julianday(value) - 2440587.5) * 86400.0


def _bin_index(session: Session, value: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(value), Integer)
    return cast(value, Integer)  # non-negative here: truncation is floor


def _histogram(session: Session, current: Any) -> list[HistogramBin]:
    expires = current.c.expires
    first, last = session.execute(select(func.min(expires), func.max(expires))).one()
    first, last = _aware(first), _aware(last)
    if first is None or last is None:
        return []
    span = max((last - first).total_seconds(), 1.0)
    width = span / HISTOGRAM_BINS
    t0 = first.timestamp()
    index = _bin_index(session, (_epoch_seconds(session, expires) - t0) / width).label("bin")
    counts = [0] * HISTOGRAM_BINS
    for bin_number, count in session.execute(
        select(index, func.count()).where(expires.is_not(None)).group_by(index)
    ).all():
        counts[min(max(int(bin_number), 0), HISTOGRAM_BINS - 1)] += int(count)
    return [
        HistogramBin(
            start=first + dt.timedelta(seconds=i * width),
            end=first + dt.timedelta(seconds=(i + 1) * width),
            count=n,
        )
        for i, n in enumerate(counts)
    ]


def _devices(session: Session, current: Any, condition: Any, limit: int) -> list[ExpiringDevice]:
    expires = current.c.expires
    rows = session.execute(
        select(current.c.device_id, expires)
        .where(condition)
        .order_by(expires.asc().nulls_first(), current.c.device_id)
        .limit(limit)
    ).all()
    return [ExpiringDevice(device_id=d, not_after=_aware(e)) for d, e in rows]


def expiry_report(session: Session, now: dt.datetime, limit: int = LIST_LIMIT) -> ExpiryReport:
    """The report: disjoint buckets, histogram, expired and soonest devices (``limit`` each)."""
    counts = expiry_counts(session, now)
    buckets = {"expired": counts.without_valid_certificate}
    below = 0
    for label, _ in WINDOWS:
        buckets[f"<{label}"] = counts.within[label] - below
        below = counts.within[label]
    buckets["later"] = counts.active_devices - counts.without_valid_certificate - below
    current = _current()
    expires = current.c.expires
    return ExpiryReport(
        generated_at=now,
        active_devices=counts.active_devices,
        buckets=buckets,
        next_expiry=counts.next_expiry,
        histogram=_histogram(session, current),
        expired=_devices(session, current, or_(expires.is_(None), expires <= now), limit),
        soonest=_devices(session, current, expires > now, limit),
        by_issuer=dict(issuer_use(session, now).devices),
    )
