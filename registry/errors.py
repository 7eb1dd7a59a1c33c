"""Errors the registry raises on purpose; the API turns each into one HTTP status.

CertfleetError
 └── RegistryError                  anything the registry refuses
      ├── NotFoundError             404  no such device
      ├── ConflictError             409  a serial / hardware serial bound elsewhere
      │    ├── AlreadyDecommissionedError   409  decommission of a decommissioned device
      │    ├── DecommissionedDeviceError    409  a new certificate for a decommissioned device
      │    ├── LiveCertificateError         409  a re-enrollment of a device that still has a
      │    │                                     live, unexpired certificate
      │    └── ConfirmRefusedError          409  a renewal confirm the registry cannot record
      ├── InvalidCertificateError   422  not PEM, not a device certificate, not ours
      ├── InvalidCSRError           422  a CSR the factory's checks refuse, or for another device
      ├── InvalidRequestError       422  a cursor or filter that cannot be used
      ├── RenewedTooSoonError       429  a device renewed again within the renewal interval
      ├── SigninRateLimitedError    429  too many failed console sign-ins from one address
      └── UnavailableError          503  a dependency (database, CRL signer) is not ready; retry
ConfigError
 └── RegistryTlsError               a TLS certificate, key or CA file of the registry is unusable
"""

from __future__ import annotations

from fleetcore.errors import CertfleetError, ConfigError

__all__ = [
    "AlreadyDecommissionedError",
    "ConfirmRefusedError",
    "ConflictError",
    "DecommissionedDeviceError",
    "InvalidCSRError",
    "InvalidCertificateError",
    "InvalidRequestError",
    "LiveCertificateError",
    "NotFoundError",
    "RegistryError",
    "RegistryTlsError",
    "RenewedTooSoonError",
    "SigninRateLimitedError",
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


class DecommissionedDeviceError(ConflictError):
    code = "device_decommissioned"


class LiveCertificateError(ConflictError):
    code = "live_certificate"


class ConfirmRefusedError(ConflictError):
    """A renewal confirm the registry refuses; ``refusal`` is the wire code sent back
    (``unknown_serial``, ``certificate_revoked``, ``not_newest``)."""

    code = "confirm_refused"

    def __init__(self, refusal: str, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class InvalidCertificateError(RegistryError):
    status = 422
    code = "invalid_certificate"


class InvalidCSRError(RegistryError):
    status = 422
    code = "invalid_csr"


class InvalidRequestError(RegistryError):
    status = 422
    code = "invalid_request"


class RenewedTooSoonError(RegistryError):
    """``since_s``: seconds since the device's last renewal."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, since_s: float) -> None:
        super().__init__(message)
        self.since_s = since_s


class SigninRateLimitedError(RegistryError):
    """Too many failed console sign-ins from one client address in the window."""

    status = 429
    code = "rate_limited"

    def __init__(self, client: str, retry_after_s: int) -> None:
        minutes, seconds = divmod(retry_after_s, 60)
        wait = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
        super().__init__(f"Too many failed sign-ins from {client}. Try again in {wait}.")
        self.retry_after_s = retry_after_s


class UnavailableError(RegistryError):
    status = 503
    code = "unavailable"


class RegistryTlsError(ConfigError):
    """A TLS certificate, key or CA file of the registry is missing or unusable (at start)."""
