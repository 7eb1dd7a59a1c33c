"""Structured logging: one line per event, set up once by the CLI for every part.

Every part logs through the standard library as ``"<event> key=value ..."``. Two renderings
(``--log-format``, ``CERTFLEET_LOG_FORMAT``):

- ``logfmt`` (default): ``ts=... level=... logger=... <event> key=value ...``;
- ``json``: one JSON object per line (structlog's ``ProcessorFormatter``), the message's
  ``key=value`` pairs lifted into fields: ``{"ts": ..., "level": "info", "logger":
  "registry.crl", "event": "crl signed", "crl_number": "3", ...}``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

from fleetcore.config import log_level
from fleetcore.errors import ConfigError

__all__ = ["LOG_FORMATS", "LogFormat", "configure_logging", "split_event"]

LogFormat = Literal["logfmt", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("logfmt", "json")

_PAIR = re.compile(
    r"""(?:^|\s)([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)"""
)
_RESERVED = frozenset({"ts", "level", "logger", "event", "exception"})


class _LogfmtFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg`` on one line; messages carry their own key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        timestamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage().replace("\n", "\\n")
        line = (
            f"ts={timestamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} {message}"
        )
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info).replace("\n", "\\n"))
        return line


def split_event(message: str) -> tuple[str, dict[str, str]]:
    """``"crl signed crl_number=3 entries=0"`` -> ``("crl signed", {"crl_number": "3", ...})``."""
    first = _PAIR.search(message)
    if first is None:
        return message.strip(), {}
    fields: dict[str, str] = {}
    for match in _PAIR.finditer(message, first.start()):
        key, value = match.group(1), match.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        fields[f"field_{key}" if key in _RESERVED else key] = value
    return message[: first.start()].strip(), fields


def _lift_pairs(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # ProcessorFormatter put the formatted message in "event" (the record's args are gone).
    event, fields = split_event(str(event_dict.get("event", "")))
    event_dict["event"] = event
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["logger"] = record.name
    for key, value in fields.items():
        event_dict.setdefault(key, value)
    return event_dict


def _json_formatter() -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _lift_pairs,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        pass_foreign_args=False,
    )


def configure_logging(level: str = "info", log_format: str = "logfmt") -> None:
    """Send certfleet's logs to stderr as one structured line per event.

    A level not one of :data:`fleetcore.config.LOG_LEVELS`, or a format not one of
    LOG_FORMATS, is a ConfigError."""
    numeric = log_level(level)
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_json_formatter() if log_format == "json" else _LogfmtFormatter())
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    # Third-party chatter stays at warning unless asked for.
    for noisy in ("amqtt", "transitions", "uvicorn.access", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
