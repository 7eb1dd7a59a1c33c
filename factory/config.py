"""How every part builds its settings object: ``CERTFLEET_*`` environment variables with
CLI flags on top, and a bad value refused as one ConfigError naming the variable."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

from factory.errors import ConfigError

__all__ = ["LOG_LEVELS", "log_level", "secret_bytes", "settings_from_env"]

#: The log levels every part accepts (``--log-level``, ``CERTFLEET_LOG_LEVEL``).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_from_env(cls: type[SettingsT], what: str, overrides: dict[str, Any]) -> SettingsT:
    """``cls`` from ``CERTFLEET_*`` variables, with the non-None ``overrides`` (CLI flags) on
    top; a bad value is a ConfigError naming every setting at fault, not a traceback."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = "; ".join(
            f"{_variable(prefix, error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"invalid {what} settings: {problems}") from None


def _variable(prefix: str, loc: tuple[int | str, ...]) -> str:
    """Where a setting comes from: its environment variable, or the flag that set it."""
    name = ".".join(str(part) for part in loc)
    return f"{prefix}{name.upper()} (or its flag)"


def secret_bytes(secret: SecretStr | None) -> bytes | None:
    """A secret setting as bytes; None when unset or empty."""
    if secret is None or not secret.get_secret_value():
        return None
    return secret.get_secret_value().encode()


def log_level(name: str) -> int:
    """A log level name (any case) as a :mod:`logging` level; ConfigError listing the valid
    ones otherwise. The one place certfleet parses log levels."""
    normalized = name.strip().lower()
    if normalized not in LOG_LEVELS:
        raise ConfigError(f"log level {name!r} is not one of {', '.join(LOG_LEVELS)}")
    return int(logging.getLevelName(normalized.upper()))
