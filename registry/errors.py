"""Errors the registry raises on purpose; the API turns each into one HTTP status.

CertfleetError
 └── RegistryError                  anything the registry refuses
      ├── NotFoundError             404  no such device
      ├── ConflictError             409  a serial / hardware serial bound elsewhere
      │    └── AlreadyDecommissionedError   409  decommission of a decommissioned device
      ├── InvalidCertificateError   422  not PEM, not a device certificate, not ours
      ├── InvalidRequestError       422  a cursor or filter that cannot be used
      └── UnavailableError          503  a dependency (database, CRL signer) is not ready; retry
"""

from __future__ import annotations

from fleetcore.errors import CertfleetError

__all__ = [
    "AlreadyDecommissionedError",
    "ConflictError",
    "InvalidCertificateError",
    "InvalidRequestError",
    "NotFoundError",
    "RegistryError",
    "UnavailableError",
]


class RegistryError(CertfleetError):
    """The registry refuses a request. ``status`` and ``code`` shape the HTTP answer."""

    status = 400
    code = "bad_request"


class NotFoundError(RegistryError):
    status = 404
    code = "not_found"


class ConflictError(RegistryError):
    status = 409
    code = "conflict"


class AlreadyDecommissionedError(ConflictError):
    code = "already_decommissioned"


class InvalidCertificateError(RegistryError):
    status = 422
    code = "invalid_certificate"


class InvalidRequestError(RegistryError):
    status = 422
    code = "invalid_request"


class UnavailableError(RegistryError):
    status = 503
    code = "unavailable"
