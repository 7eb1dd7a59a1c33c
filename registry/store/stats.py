"""Fleet statistics: devices by status, seen in the last minute, expiries per week."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlmodel import Session, col, func, select

from registry.models import Certificate, Device, Stats, WeekCount

__all__ = ["stats"]


#: Weeks counted per statement (one indexed range count each; SQLite allows 2000 columns).
_WEEKS_PER_STATEMENT = 100


def _expiries_per_week(session: Session, now: dt.datetime) -> list[WeekCount]:
    """Live, not yet expired certificates by the UTC week (Monday) of their not_after.

    One range count per week on the (status, not_after) index, instead of a GROUP BY over a
    per-row date expression: at 100,000 certificates on SQLite that was 47 ms (a date()
    call and a temporary B-tree per row), and the range counts take a few.
    """
    live = (Certificate.status == "live", col(Certificate.not_after) >= now)
    if session.get_bind().dialect.name == "postgresql":
        return _expiries_per_week_grouped(session, live)
    last = session.exec(select(func.max(Certificate.not_after)).where(*live)).one()
    if last is None:
        return []
    utc_now = now.astimezone(dt.UTC)
    monday = dt.datetime.combine(
        utc_now.date() - dt.timedelta(days=utc_now.weekday()), dt.time(), tzinfo=dt.UTC
    )
    starts = []
    while monday <= last:
        starts.append(monday)
        monday += dt.timedelta(weeks=1)
    counts: list[WeekCount] = []
    for chunk in range(0, len(starts), _WEEKS_PER_STATEMENT):
        weeks = starts[chunk : chunk + _WEEKS_PER_STATEMENT]
        row = session.execute(
            select(
                *[
                    select(func.count())
                    .where(
                        Certificate.status == "live",
                        col(Certificate.not_after) >= max(week, now),
                        col(Certificate.not_after) < week + dt.timedelta(weeks=1),
                    )
                    .scalar_subquery()
                    for week in weeks
                ]
            )
        ).one()
        counts += [
            WeekCount(week_start=week.date(), count=int(n))
            for week, n in zip(weeks, tuple(row), strict=True)
            if n
        ]
    return counts


def _expiries_per_week_grouped(session: Session, live: tuple[Any, ...]) -> list[WeekCount]:
    """PostgreSQL: one GROUP BY on the UTC week of not_after. There, a hundred scalar range
    counts cost ten times this one scan (about 150 ms against 15 ms at 100,000 certificates),
    as each count visits the heap for visibility."""
    week = func.date_trunc("week", func.timezone("UTC", col(Certificate.not_after)))
    rows = session.execute(
        select(week, func.count()).where(*live).group_by(week).order_by(week)
    ).all()
    return [WeekCount(week_start=start.date(), count=int(n)) for start, n in rows]


def stats(session: Session, now: dt.datetime) -> Stats:
    """Counts by status, devices seen in the last minute, live certificates' weekly expiries."""
    by_status = {"active": 0, "decommissioned": 0}
    for status, count in session.exec(
        select(Device.status, func.count()).group_by(col(Device.status))
    ).all():
        by_status[status] = int(count)
    seen = session.exec(
        select(func.count()).where(col(Device.last_seen_at) >= now - dt.timedelta(minutes=1))
    ).one()
    return Stats(
        devices_by_status=by_status,
        expiries_per_week=_expiries_per_week(session, now),
        seen_last_minute=int(seen),
    )
