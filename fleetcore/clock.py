"""The one clock every part reads: timezone-aware UTC."""

from __future__ import annotations

import datetime as dt

__all__ = ["utcnow"]


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC (never naive)."""
    return dt.datetime.now(dt.UTC)
