"""The one clock every part reads: timezone-aware UTC."""

from __future__ import annotations

import datetime as dt

__all__ = ["naive_utc", "utcnow"]


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC (never naive)."""
    return dt.datetime.now(dt.UTC)


def naive_utc(moment: dt.datetime) -> dt.datetime:
    """``moment`` as naive UTC: what cryptography's builder setters do to a time and their
    constructors do not (a naive time is taken as UTC already)."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(dt.UTC).replace(tzinfo=None)
