"""MQTT topics and filters as NATS subjects: the mapping and its round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.cluster.subjects import (
    SUBJECT_PREFIX,
    filter_subjects,
    subject_of_topic,
    topic_of_subject,
)
from fleetcore.topics import TELEMETRY_FILTER, telemetry_topic

P = SUBJECT_PREFIX


def test_device_topic_levels_become_tokens() -> None:
    assert subject_of_topic(telemetry_topic("dev-1")) == f"{P}.devices.dev-1.telemetry"


def test_wildcards_map_like_the_nats_mqtt_gateway() -> None:
    assert filter_subjects(TELEMETRY_FILTER) == (f"{P}.devices.*.telemetry",)
    assert filter_subjects("devices/d/#") == (f"{P}.devices.d", f"{P}.devices.d.>")
    assert filter_subjects("#") == (f"{P}.>",)


@pytest.mark.parametrize(
    ("topic", "subject"),
    [
        ("a.b/c", f"{P}.a~2Eb.c"),
        ("a*/>", f"{P}.a~2A.~3E"),
        ("/lead//trail/", f"{P}.~.lead.~.trail.~"),
        ("sp ace/tab\t", f"{P}.sp~20ace.tab~09"),
        ("tilde~", f"{P}.tilde~7E"),
    ],
)
def test_characters_illegal_in_subjects_are_escaped(topic: str, subject: str) -> None:
    assert subject_of_topic(topic) == subject
    assert topic_of_subject(subject) == topic


def test_a_topic_with_a_wildcard_is_not_a_subject() -> None:
    with pytest.raises(ValueError, match="holds a wildcard"):
        subject_of_topic("devices/+/telemetry")


def test_bad_filters_are_refused() -> None:
    with pytest.raises(ValueError, match="must be the last level"):
        filter_subjects("a/#/b")
    with pytest.raises(ValueError, match="fill a whole level"):
        filter_subjects("a/b+/c")


def test_foreign_subjects_are_refused() -> None:
    with pytest.raises(ValueError, match="is not under"):
        topic_of_subject("other.devices.x")
    with pytest.raises(ValueError, match="bad escape"):
        topic_of_subject(f"{P}.a~zz")


_level = st.text(st.characters(blacklist_characters="/+#\x00"), max_size=12)


@given(st.lists(_level, min_size=1, max_size=6))
def test_every_topic_round_trips_and_makes_valid_tokens(levels: list[str]) -> None:
    topic = "/".join(levels)
    subject = subject_of_topic(topic)
    tokens = subject.split(".")
    assert all(tokens), subject
    assert not any(ch.isspace() or ch in "*>" for ch in subject), subject
    assert topic_of_subject(subject) == topic


def test_the_fast_path_knows_every_character_that_is_escaped() -> None:
    """A level with none of these characters is used as its token unchanged."""
    from broker.cluster.subjects import _NEEDS_ESCAPE, _escape_char

    changed = [chr(code) for code in range(0x110000) if _escape_char(chr(code)) != chr(code)]
    flagged = [chr(code) for code in range(0x110000) if _NEEDS_ESCAPE.search(chr(code))]
    assert changed == flagged
