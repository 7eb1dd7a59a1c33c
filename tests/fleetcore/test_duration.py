"""Durations written as 365d, 12h, 30m."""

from __future__ import annotations

import datetime as dt

import pytest

from fleetcore.duration import format_duration, parse_duration
from fleetcore.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("365d", dt.timedelta(days=365)),
        ("12h", dt.timedelta(hours=12)),
        ("30m", dt.timedelta(minutes=30)),
        ("45s", dt.timedelta(seconds=45)),
        ("2w", dt.timedelta(weeks=2)),
        (" 90D ", dt.timedelta(days=90)),
    ],
)
def test_durations_parse(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "d", "365", "1.5d", "-1d", "10y", "3 days", "1d2h"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a duration: write a whole number followed by"):
        parse_duration(text, what="--lifetime")


def test_zero_is_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="--stagger must be longer than zero"):
        parse_duration("0d", what="--stagger")
    assert parse_duration("0d", allow_zero=True) == dt.timedelta(0)


def test_format_is_the_inverse() -> None:
    for text in ("365d", "12h", "30m", "2w", "90s"):
        assert format_duration(parse_duration(text)) == text
