"""MQTT topic names: built, parsed and recognised by one module every part uses."""

from __future__ import annotations

import pytest

from fleetcore.topics import (
    RENEW,
    RENEW_FILTER,
    TELEMETRY,
    TELEMETRY_FILTER,
    device_of,
    has_wildcard,
    is_renewal_topic,
    issued_topic,
    renew_topic,
    split_device_topic,
    telemetry_topic,
    topic_matches,
)


def test_builders_spell_the_documented_topics() -> None:
    assert telemetry_topic("dev-1") == "devices/dev-1/telemetry"
    assert renew_topic("dev-1") == "devices/dev-1/cert/renew"
    assert issued_topic("dev-1") == "devices/dev-1/cert/issued"
    assert TELEMETRY_FILTER == "devices/+/telemetry"
    assert RENEW_FILTER == "devices/+/cert/renew"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/dev-1/telemetry", ("dev-1", "telemetry")),
        ("devices/dev-1/cert/renew", ("dev-1", "cert/renew")),
        ("devices/+/#", ("+", "#")),
        ("devices/dev-1", None),
        ("devices//telemetry", None),
        ("devices/dev-1/", None),
        ("device/dev-1/telemetry", None),
        ("$SYS/broker", None),
    ],
)
def test_split_device_topic(topic: str, expected: tuple[str, str] | None) -> None:
    assert split_device_topic(topic) == expected


def test_device_of_matches_the_whole_suffix() -> None:
    assert device_of("devices/dev-1/telemetry", TELEMETRY) == "dev-1"
    assert device_of("devices/dev-1/telemetry/extra", TELEMETRY) is None
    assert device_of("devices/dev-1/cert/renew", RENEW) == "dev-1"
    assert device_of("devices/dev-1/cert/issued", RENEW) is None
    assert device_of("x/devices/dev-1/cert/renew", RENEW) is None


def test_renewal_topics_and_wildcards() -> None:
    assert is_renewal_topic(renew_topic("d")) and is_renewal_topic(issued_topic("d"))
    assert not is_renewal_topic(telemetry_topic("d"))
    assert not is_renewal_topic("devices/d/cert/renew/x")
    assert has_wildcard(TELEMETRY_FILTER) and has_wildcard("devices/d/#")
    assert not has_wildcard(telemetry_topic("d"))


@pytest.mark.parametrize(
    ("topic", "topic_filter", "matches"),
    [
        ("devices/d/telemetry", TELEMETRY_FILTER, True),
        ("devices/d/cert/renew", TELEMETRY_FILTER, False),
        ("devices/d/cert/renew", "devices/d/#", True),
        ("devices/d", "devices/d/#", True),  # '#' also matches the parent level
        ("devices/d/telemetry", "devices/d", False),
        ("$SYS/broker", "#", False),  # [MQTT-4.7.2-1]
        ("$SYS/broker", "$SYS/#", True),
        ("a/b", "a/b+", False),  # a malformed wildcard level matches nothing
    ],
)
def test_topic_matches(topic: str, topic_filter: str, matches: bool) -> None:
    assert topic_matches(topic, topic_filter) is matches
