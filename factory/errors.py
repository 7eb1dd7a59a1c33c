"""What the factory refuses: subclasses of the root error (``fleetcore.errors``).

CertfleetError (fleetcore)
 ├── FactoryError           anything the factory refuses
 │    ├── CAError           CA missing, already present, unreadable or wrong passphrase
 │    ├── CSRError          a certificate signing request is refused
 │    ├── ProvisionError    a provisioning batch input is refused
 │    ├── RegistrationError the registry refused or could not take a batch
 │    └── ExportError       a bundle cannot be exported (missing, damaged, bad password file)
 └── OcspCheckError         an OCSP responder could not be asked, or its answer is not to be
                            believed
"""

from __future__ import annotations

from fleetcore.errors import CertfleetError

__all__ = [
    "CAError",
    "CSRError",
    "ExportError",
    "FactoryError",
    "OcspCheckError",
    "ProvisionError",
    "RegistrationError",
]


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


class OcspCheckError(CertfleetError):
    """The responder could not be asked, or its answer is not to be believed."""
