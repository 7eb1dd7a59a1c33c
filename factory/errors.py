"""Exception hierarchy shared by every certfleet part.

    CertfleetError
     ├── ConfigError            bad settings, flags or paths
     ├── IdentityError          a certificate does not carry exactly one valid certfleet identity
     ├── RegistryCallError      an operator call to the registry failed or was refused
     └── FactoryError           anything the factory refuses
          ├── CAError           CA missing, already present, unreadable or wrong passphrase
          ├── CSRError          a certificate signing request is refused
          ├── ProvisionError    a provisioning batch input is refused
          ├── RegistrationError the registry refused or could not take a batch
          └── ExportError       a bundle cannot be exported (missing, damaged, bad password file)

Messages say what is wrong and what to do about it; the CLI prints them as one line.
"""

from __future__ import annotations

__all__ = [
    "CAError",
    "CSRError",
    "CertfleetError",
    "ConfigError",
    "ExportError",
    "FactoryError",
    "IdentityError",
    "ProvisionError",
    "RegistrationError",
    "RegistryCallError",
]


class CertfleetError(Exception):
    """Base of every error certfleet raises on purpose."""


class ConfigError(CertfleetError):
    """A setting, flag or path is unusable."""


class IdentityError(CertfleetError):
    """A certificate carries no, several, or a malformed certfleet identity."""


class RegistryCallError(CertfleetError):
    """An operator command's call to the registry could not be made or was refused."""


class FactoryError(CertfleetError):
    """The factory refuses a request."""


class CAError(FactoryError):
    """The CA is missing, already exists, or its key cannot be read."""


class CSRError(FactoryError):
    """A certificate signing request is refused."""


class ProvisionError(FactoryError):
    """A provisioning batch's input is refused."""


class RegistrationError(FactoryError):
    """The registry refused a batch (conflict, credentials) or stayed unreachable."""


class ExportError(FactoryError):
    """A device bundle cannot be exported in the format asked for."""
