"""Structured logging: one line per event, ``key=value`` pairs, set up once by the CLI."""

from __future__ import annotations

import logging
import sys
import time

from factory.config import log_level

__all__ = ["configure_logging"]


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


def configure_logging(level: str = "info") -> None:
    """Send certfleet's logs to stderr as one structured line per event.

    A level that is not one of :data:`factory.config.LOG_LEVELS` is a ConfigError."""
    numeric = log_level(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    # Third-party chatter stays at warning unless asked for.
    for noisy in ("amqtt", "transitions", "uvicorn.access", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
