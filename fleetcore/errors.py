"""The root of every certfleet error, and the errors every part shares.

    CertfleetError
     ├── ConfigError            bad settings, flags or paths
     │    └── TlsSetupError     a TLS certificate, key or CA file is missing or unusable
     ├── IdentityError          a certificate does not carry exactly one valid certfleet identity
     ├── RegistryCallError      an operator call to the registry failed or was refused
     ├── AnswerError            a renewal answer that is neither a certificate nor a refusal
     └── ConfirmError           a renewal confirm payload that is not {"confirm": "<serial>"}

Each part subclasses ``CertfleetError`` for what only it refuses (``factory.errors``,
for instance). Messages say what is wrong and what to do about it; the CLI prints them as
one line.
"""

from __future__ import annotations

__all__ = [
    "AnswerError",
    "CertfleetError",
    "ConfigError",
    "ConfirmError",
    "IdentityError",
    "RegistryCallError",
    "TlsSetupError",
]


class CertfleetError(Exception):
    """Base of every error certfleet raises on purpose."""


class ConfigError(CertfleetError):
    """A setting, flag or path is unusable."""


class TlsSetupError(ConfigError):
    """A TLS certificate, key or CA file is missing or unusable (the message says which)."""


class IdentityError(CertfleetError):
    """A certificate carries no, several, or a malformed certfleet identity."""


class RegistryCallError(CertfleetError):
    """An operator command's call to the registry could not be made or was refused."""


class AnswerError(CertfleetError):
    """An answer on ``cert/issued`` is neither a readable certificate nor a refusal."""


class ConfirmError(CertfleetError):
    """A confirm payload that is not ``{"confirm": "<serial, lower-case hex>"}``."""
