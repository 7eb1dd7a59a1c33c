"""How every part builds its settings object: CLI flags over ``CERTFLEET_*`` environment
variables over the config file over defaults, and a bad value refused as one ConfigError
naming where it came from.

The config file is TOML (``certfleet --config FILE``, or ``CERTFLEET_CONFIG``): the same
names as the variables without ``CERTFLEET_``, lower case, at the top level or in a table
named after their first word (``[registry] addr = ...`` is ``registry_addr``). Keys and
``CERTFLEET_*`` variables that no part knows are warned about, naming the closest real one.
"""

from __future__ import annotations

import difflib
import logging
import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

from fleetcore.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "LOG_LEVELS",
    "NON_SETTING_VARIABLES",
    "config_file_values",
    "log_level",
    "passphrase_bytes",
    "read_secret_file",
    "secret_bytes",
    "settings_from_env",
    "unknown_settings",
]

#: The log levels every part accepts (``--log-level``, ``CERTFLEET_LOG_LEVEL``).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

#: The variable naming the config file (``--config`` sets it, so child processes see it).
CONFIG_ENV = "CERTFLEET_CONFIG"
PREFIX = "CERTFLEET_"
#: ``CERTFLEET_*`` variables that are read outside the settings objects.
NON_SETTING_VARIABLES = frozenset(
    {
        CONFIG_ENV,
        "CERTFLEET_LOG_LEVEL",
        "CERTFLEET_LOG_FORMAT",
        "CERTFLEET_TRACEBACK",
        "CERTFLEET_TEST_POSTGRES_URL",
    }
)

_cache: dict[tuple[str, int, int], dict[str, Any]] = {}


def _flatten(table: Mapping[str, Any], prefix: str, path: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".lower().replace("-", "_")
        if isinstance(value, dict):
            if prefix:
                raise ConfigError(f"config file {path}: table [{prefix}{key}] nests too deep")
            flat.update(_flatten(value, f"{name}_", path))
        else:
            flat[name] = value
    return flat


def config_file_values(path: Path | None = None) -> dict[str, Any]:
    """The config file's settings, flattened (``{}`` when there is no config file)."""
    if path is None:
        named = os.environ.get(CONFIG_ENV)
        if not named:
            return {}
        path = Path(named)
    try:
        info = path.stat()
        key = (str(path.resolve()), info.st_mtime_ns, info.st_size)
        if key not in _cache:
            _cache[key] = _flatten(tomllib.loads(path.read_text()), "", path)
        return _cache[key]
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (--config / {CONFIG_ENV})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def settings_from_env(cls: type[SettingsT], what: str, overrides: dict[str, Any]) -> SettingsT:
    """``cls`` from flags (the non-None ``overrides``), then ``CERTFLEET_*`` variables, then
    the config file; a bad value is a ConfigError naming every setting at fault."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    from_file = {
        name: value
        for name, value in config_file_values().items()
        if name in cls.model_fields and f"{prefix}{name.upper()}" not in os.environ
    }
    given = {**from_file, **{key: value for key, value in overrides.items() if value is not None}}
    try:
        return cls(**given)
    except ValidationError as exc:
        file_keys = set(from_file) - {k for k, v in overrides.items() if v is not None}
        problems = "; ".join(
            f"{_source(prefix, error['loc'], file_keys)}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"invalid {what} settings: {problems}") from None


def _source(prefix: str, loc: tuple[int | str, ...], file_keys: set[str]) -> str:
    """Where a setting comes from: the config file, or its variable (or the flag that set it)."""
    name = ".".join(str(part) for part in loc)
    if name in file_keys:
        return f"{name} in config file {os.environ.get(CONFIG_ENV)}"
    return f"{prefix}{name.upper()} (or its flag)"


def unknown_settings(
    classes: Iterable[type[BaseSettings]],
    *,
    environ: Mapping[str, str] | None = None,
    file_values: Mapping[str, Any] | None = None,
) -> list[str]:
    """One warning per config-file key and ``CERTFLEET_*`` variable no settings class knows,
    each naming the closest known one."""
    environ = os.environ if environ is None else environ
    file_values = config_file_values() if file_values is None else file_values
    known = sorted({name for cls in classes for name in cls.model_fields})
    variables = sorted({f"{PREFIX}{name.upper()}" for name in known} | NON_SETTING_VARIABLES)
    warnings = []
    for key in sorted(file_values):
        if key not in known:
            warnings.append(
                f"config file {environ.get(CONFIG_ENV, '')}: unknown key {key!r}"
                + _closest(key, known)
            )
    for variable in sorted(environ):
        if variable.startswith(PREFIX) and variable not in variables:
            warnings.append(
                f"unknown environment variable {variable}" + _closest(variable, variables)
            )
    return warnings


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else " (no setting is named like it)"


def secret_bytes(secret: SecretStr | None) -> bytes | None:
    """A secret setting as bytes; None when unset or empty."""
    if secret is None or not secret.get_secret_value():
        return None
    return secret.get_secret_value().encode()


def read_secret_file(path: Path, what: str) -> bytes:
    """The first line of ``path`` (newline dropped); ConfigError if it is missing, empty, or
    readable by other users (a secret in such a file is no secret)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"chmod 600 {path}"
        )
    secret = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not secret:
        raise ConfigError(f"{what} {path} is empty (the secret goes on its first line)")
    return secret


def passphrase_bytes(secret: SecretStr | None, secret_file: Path | None) -> bytes | None:
    """The CA passphrase from ``CERTFLEET_CA_PASSPHRASE`` or from ``--passphrase-file``
    (``CERTFLEET_CA_PASSPHRASE_FILE``); both at once is refused, not guessed between."""
    if secret_file is None:
        return secret_bytes(secret)
    if secret_bytes(secret) is not None:
        raise ConfigError(
            "both CERTFLEET_CA_PASSPHRASE and a passphrase file are set; keep only one"
        )
    return read_secret_file(secret_file, "--passphrase-file")


def log_level(name: str) -> int:
    """A log level name (any case) as a :mod:`logging` level; ConfigError listing the valid
    ones otherwise. The one place certfleet parses log levels."""
    normalized = name.strip().lower()
    if normalized not in LOG_LEVELS:
        raise ConfigError(f"log level {name!r} is not one of {', '.join(LOG_LEVELS)}")
    return int(logging.getLevelName(normalized.upper()))
