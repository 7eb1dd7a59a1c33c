"""MQTT topic names and filters as NATS subjects (the cluster's one mapping).

Like NATS's own MQTT gateway: each MQTT level is one subject token, ``/`` becomes ``.``,
the wildcard ``+`` becomes ``*`` and ``#`` becomes ``>``. Every subject lives under a
prefix of ours, so nothing else on the NATS server can collide with MQTT traffic: a message
stored in JetStream under :data:`SUBJECT_PREFIX` (the message stream's subjects), one
routed live only under :data:`LIVE_PREFIX`, outside them.

A token may not be empty and may not hold ``.``, ``*``, ``>`` or whitespace, while an MQTT
level may hold anything but ``/``, ``+`` and ``#``. Those characters, and the escape
character ``~`` itself, are written ``~XX`` (two upper-case hex digits; ``~UXXXXXX`` for a
non-ASCII whitespace character); an empty level is the token ``~``. The mapping is
reversible (:func:`topic_of_subject` undoes :func:`subject_of_topic`), which the tests
hold for arbitrary topics.

An MQTT filter ending in ``#`` also matches its parent (``devices/d/#`` matches
``devices/d``), a NATS ``>`` does not: :func:`filter_subjects` returns both subjects then.
Topic *knowledge* (what a device topic is) stays in :mod:`fleetcore.topics`; this module only
translates spelling.
"""

from __future__ import annotations

import re
from typing import Final

from fleetcore.topics import has_wildcard

__all__ = [
    "LIVE_PREFIX",
    "RETAINED_PREFIX",
    "SUBJECT_PREFIX",
    "filter_subjects",
    "subject_of_topic",
    "topic_of_subject",
]

#: Root of the subjects of MQTT messages stored in JetStream on their way between the nodes
#: (the message stream captures it: :data:`broker.cluster.durable.STREAM`).
SUBJECT_PREFIX: Final = "certfleet.mqtt"
#: Root of the subjects of MQTT messages routed live only. Outside the message stream's
#: subjects on purpose: a stream keeps every message published on its subjects that one of
#: its consumers matches, so a live message there was also kept for a persistent session
#: and reached it twice, live and from its consumer (round 10's CI).
LIVE_PREFIX: Final = "certfleet.live"
#: Root of the subjects holding the last retained message of each topic.
RETAINED_PREFIX: Final = "certfleet.retained"
_ESCAPE: Final = "~"
_EMPTY_LEVEL: Final = "~"
_ILLEGAL: Final = frozenset(".*>~")


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _ILLEGAL or char.isspace() or code < 0x20 or code == 0x7F:
        return f"{_ESCAPE}{code:02X}" if code < 0x100 else f"{_ESCAPE}U{code:06X}"
    return char


#: A character _escape_char would change (``\s`` is str.isspace's whitespace).
_NEEDS_ESCAPE: Final = re.compile(r"[.*>~\s\x00-\x1f\x7f]")


def _token_of_level(level: str) -> str:
    if not level:
        return _EMPTY_LEVEL
    if _NEEDS_ESCAPE.search(level) is None:
        return level  # the usual level (device ids, "telemetry"): nothing to escape
    return "".join(_escape_char(char) for char in level)


def _level_of_token(token: str) -> str:
    if token == _EMPTY_LEVEL:
        return ""
    if _ESCAPE not in token:
        return token
    level: list[str] = []
    index = 0
    while index < len(token):
        char = token[index]
        if char != _ESCAPE:
            level.append(char)
            index += 1
            continue
        width = 7 if token[index + 1 : index + 2] == "U" else 2
        start = index + 1 + (1 if width == 7 else 0)
        digits = token[start : start + (6 if width == 7 else 2)]
        try:
            level.append(chr(int(digits, 16)))
        except ValueError:
            bad = token[index : start + 6]
            raise ValueError(f"bad escape {bad!r} in token {token!r}") from None
        index = start + len(digits)
    return "".join(level)


def subject_of_topic(topic: str, prefix: str = SUBJECT_PREFIX) -> str:
    """The subject an MQTT topic name (no wildcards) is published on."""
    if has_wildcard(topic):
        raise ValueError(f"topic {topic[:200]!r} holds a wildcard: use filter_subjects")
    return ".".join((prefix, *(_token_of_level(level) for level in topic.split("/"))))


def topic_of_subject(subject: str, prefix: str = SUBJECT_PREFIX) -> str:
    """The MQTT topic name a subject from :func:`subject_of_topic` stands for."""
    head = prefix + "."
    if not subject.startswith(head):
        raise ValueError(f"subject {subject[:200]!r} is not under {prefix}")
    return "/".join(_level_of_token(token) for token in subject[len(head) :].split("."))


def filter_subjects(topic_filter: str, prefix: str = SUBJECT_PREFIX) -> tuple[str, ...]:
    """The NATS subject filters matching what an MQTT filter matches (one or two)."""
    levels = topic_filter.split("/")
    tokens: list[str] = []
    for index, level in enumerate(levels):
        if level == "#":
            if index != len(levels) - 1:
                raise ValueError(f"'#' must be the last level of {topic_filter[:200]!r}")
            base = ".".join((prefix, *tokens))
            # "a/#" matches "a" too; a bare "#" matches every topic.
            return (base + ".>",) if not tokens else (base, base + ".>")
        if level == "+":
            tokens.append("*")
        elif "+" in level or "#" in level:
            raise ValueError(f"a wildcard must fill a whole level in {topic_filter[:200]!r}")
        else:
            tokens.append(_token_of_level(level))
    return (".".join((prefix, *tokens)),)
