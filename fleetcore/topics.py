"""MQTT topic names, built, parsed and matched in one place (DESIGN.md, "MQTT topics").

Every device topic is ``devices/<id>/<suffix>``: ``telemetry`` (device -> services),
``cert/renew`` (device -> the renewal service) and ``cert/issued`` (the renewal service ->
device). Services subscribe with ``+`` in the device level (:data:`TELEMETRY_FILTER`,
:data:`RENEW_FILTER`). The broker's ACL, the registry and the simulator all use these
helpers, so a topic is spelled once.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEVICES",
    "ISSUED",
    "RENEW",
    "RENEWAL_SUFFIXES",
    "RENEW_FILTER",
    "TELEMETRY",
    "TELEMETRY_FILTER",
    "device_of",
    "device_topic",
    "has_wildcard",
    "is_renewal_topic",
    "issued_topic",
    "renew_topic",
    "split_device_topic",
    "telemetry_topic",
    "topic_matches",
]

DEVICES: Final = "devices"
TELEMETRY: Final = "telemetry"
RENEW: Final = "cert/renew"
ISSUED: Final = "cert/issued"
RENEWAL_SUFFIXES: Final = (RENEW, ISSUED)
_PREFIX: Final = DEVICES + "/"


def device_topic(device_id: str, suffix: str) -> str:
    """``devices/<device_id>/<suffix>`` (``device_id`` may be ``+`` for a service filter)."""
    return f"{_PREFIX}{device_id}/{suffix}"


def telemetry_topic(device_id: str) -> str:
    return device_topic(device_id, TELEMETRY)


def renew_topic(device_id: str) -> str:
    return device_topic(device_id, RENEW)


def issued_topic(device_id: str) -> str:
    return device_topic(device_id, ISSUED)


TELEMETRY_FILTER: Final = telemetry_topic("+")
RENEW_FILTER: Final = renew_topic("+")


def split_device_topic(topic: str) -> tuple[str, str] | None:
    """``devices/<id>/<rest>`` -> ``(id, rest)``; None for anything else (empty id or rest)."""
    if not topic.startswith(_PREFIX):
        return None
    device_id, sep, rest = topic[len(_PREFIX) :].partition("/")
    if not sep or not device_id or not rest:
        return None
    return device_id, rest


def device_of(topic: str, suffix: str) -> str | None:
    """The device level of ``devices/<id>/<suffix>``; None when ``topic`` is not that."""
    parts = split_device_topic(topic)
    return parts[0] if parts is not None and parts[1] == suffix else None


def is_renewal_topic(topic: str) -> bool:
    """``devices/<id>/cert/renew`` or ``devices/<id>/cert/issued``: never retained."""
    parts = split_device_topic(topic)
    return parts is not None and parts[1] in RENEWAL_SUFFIXES


def has_wildcard(topic: str) -> bool:
    """Whether ``topic`` holds an MQTT wildcard (``+`` or ``#``): a filter, not a name."""
    return "+" in topic or "#" in topic


def topic_matches(topic: str, topic_filter: str) -> bool:
    """Whether the topic name ``topic`` matches the MQTT filter ``topic_filter``
    (``+`` one level, ``#`` the rest; a ``$`` topic never matches a filter that starts with
    a wildcard [MQTT-4.7.2-1]; a malformed wildcard level matches nothing)."""
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False
    if not has_wildcard(topic_filter):
        return topic == topic_filter
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return index == len(filter_levels) - 1
        if has_wildcard(level) and level != "+":
            return False
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
