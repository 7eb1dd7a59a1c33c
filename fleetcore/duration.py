"""Durations as operators write them on the command line: ``365d``, ``12h``, ``30m``, ``2w``."""

from __future__ import annotations

import datetime as dt
import re

from fleetcore.errors import ConfigError

__all__ = ["format_duration", "parse_duration"]

_UNITS = {
    "w": dt.timedelta(weeks=1),
    "d": dt.timedelta(days=1),
    "h": dt.timedelta(hours=1),
    "m": dt.timedelta(minutes=1),
    "s": dt.timedelta(seconds=1),
}
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([wdhms])\s*$")


def parse_duration(text: str, *, what: str = "duration", allow_zero: bool = False) -> dt.timedelta:
    """Parse ``<number><unit>`` (unit one of w, d, h, m, s) into a timedelta.

    Raises ConfigError naming ``what`` and the accepted forms.
    """
    match = _DURATION.fullmatch(text.lower()) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"{what} {text!r} is not a duration: write a whole number followed by "
            "w, d, h, m or s, for example 365d, 12h or 30m"
        )
    value = int(match.group(1)) * _UNITS[match.group(2)]
    if not value and not allow_zero:
        raise ConfigError(f"{what} must be longer than zero (got {text!r})")
    return value


def format_duration(value: dt.timedelta) -> str:
    """The shortest exact ``<number><unit>`` form of ``value`` (inverse of parse_duration)."""
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = int(_UNITS[unit].total_seconds())
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
