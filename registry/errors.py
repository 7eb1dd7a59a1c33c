"""Errors the registry raises on purpose; the API turns each RegistryError into one HTTP status.

CertfleetError
 ├── RegistryError                  anything the registry refuses (status, code)
 │    ├── NotFoundError             404  no such device
 │    ├── ConflictError             409  a serial / hardware serial bound elsewhere
 │    │    ├── AlreadyDecommissionedError   409  decommission of a decommissioned device
 │    │    ├── DecommissionedDeviceError    409  a new certificate for a decommissioned device
 │    │    ├── LiveCertificateError         409  a re-enrollment of a device that still has a
 │    │    │                                     live, unexpired certificate
 │    │    └── ConfirmRefusedError          409  a renewal confirm the registry cannot record
 │    ├── InvalidCertificateError   422  not PEM, not a device certificate, not ours
 │    ├── InvalidCSRError           422  a CSR the factory's checks refuse, or for another device
 │    ├── InvalidRequestError       422  a cursor or filter that cannot be used
 │    ├── RenewedTooSoonError       429  a device renewed again within the renewal interval
 │    ├── RateLimitedError          429  ask again after ``retry_after_s`` (Retry-After)
 │    │    ├── SigninRateLimitedError   too many failed console sign-ins from one address
 │    │    └── EstRateLimitedError      an EST re-enrollment within the renewal interval
 │    ├── UnavailableError          503  a dependency (database, CRL signer) is not ready; retry
 │    │  EST and claim enrollment (registry.est):
 │    ├── EstBadRequestError        400  a body that is not base64 DER (PEM, binary), a bad CSR
 │    ├── EstUnauthorizedError      401  no credential (no client certificate, no HTTP Basic)
 │    ├── EnrollmentRefusedError    403  a credential that does not allow this: a claim revoked,
 │    │    │                             expired or unknown, a device outside the allow-list, a
 │    │    │                             CSR naming another identity, a used secret, a device
 │    │    │                             certificate where a claim is due and the reverse
 │    │    └── ClaimQuotaError      403  the claim's quota is used up
 │    ├── AlreadyEnrolledError      409  the device id or hardware serial is enrolled already
 │    ├── PayloadTooLargeError      413  a body over the limit
 │    ├── EnrollmentPendingError    202  the pre-enrollment webhook has not approved it yet
 │    │                                  (Retry-After; RFC 7030 4.2.3): not a refusal, not issued
 │    └── EnrollmentWebhookError    503  the pre-enrollment webhook did not answer in time or
 │                                       answered something else than a decision (fails closed)
 ├── Refused                        a credential refused (status, counted reason, message)
 ├── SignInRequired                 no live console session (the console redirects)
 ├── ConsoleRefusal                 a console request refused, shown as a page
 ├── RenewalRefused                 a renewal over MQTT refused (its wire code, to the device)
 ├── TelemetryRejected              a telemetry message dropped (its counted reason)
 ├── DatabaseUnreachableError       the registry database cannot be opened
 └── ConfigError (fleetcore)
      └── RegistryTlsError          a TLS certificate, key or CA file of the registry is unusable
"""

from __future__ import annotations

from fleetcore.errors import CertfleetError, ConfigError
from fleetcore.renewal_wire import RefusalCode, refusal_payload

__all__ = [
    "AlreadyDecommissionedError",
    "AlreadyEnrolledError",
    "ClaimQuotaError",
    "ConfirmRefusedError",
    "ConflictError",
    "ConsoleRefusal",
    "DatabaseUnreachableError",
    "DecommissionedDeviceError",
    "EnrollmentRefusedError",
    "EnrollmentPendingError",
    "EnrollmentWebhookError",
    "EstBadRequestError",
    "EstRateLimitedError",
    "EstUnauthorizedError",
    "InvalidCSRError",
    "InvalidCertificateError",
    "InvalidRequestError",
    "LiveCertificateError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "Refused",
    "RegistryError",
    "RegistryTlsError",
    "RenewalRefused",
    "RenewedTooSoonError",
    "SignInRequired",
    "SigninRateLimitedError",
    "TelemetryRejected",
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


class RateLimitedError(RegistryError):
    """``retry_after_s``: when the client may ask again (the Retry-After header)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SigninRateLimitedError(RateLimitedError):
    """Too many failed console sign-ins from one client address in the window."""

    def __init__(self, client: str, retry_after_s: int) -> None:
        minutes, seconds = divmod(retry_after_s, 60)
        wait = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
        super().__init__(
            f"Too many failed sign-ins from {client}. Try again in {wait}.",
            retry_after_s=retry_after_s,
        )


class EstRateLimitedError(RateLimitedError):
    """A re-enrollment over EST within the renewal interval."""


class UnavailableError(RegistryError):
    status = 503
    code = "unavailable"


class RegistryTlsError(ConfigError):
    """A TLS certificate, key or CA file of the registry is missing or unusable (at start)."""


class Refused(CertfleetError):
    """Why a credential is refused: the HTTP status, the counted reason, a message to act on."""

    def __init__(self, status: int, reason: str, message: str, identity: str = "-") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.identity = identity


class SignInRequired(CertfleetError):
    """No live console session: pages redirect to the sign-in page, fragments get a 401."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class ConsoleRefusal(CertfleetError):
    """A refused console request, shown as a page with a status and one clear message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DatabaseUnreachableError(CertfleetError):
    """The registry database cannot be opened (server down, wrong URL, missing folder)."""


class RenewalRefused(CertfleetError):
    """A renewal request the registry refuses; ``error`` is the code sent to the device."""

    def __init__(self, error: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.error = error

    def payload(self) -> bytes:
        return refusal_payload(self.error, str(self))


class TelemetryRejected(CertfleetError):
    """A telemetry message that is dropped; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EstBadRequestError(RegistryError):
    status = 400
    code = "bad_request"


class EstUnauthorizedError(RegistryError):
    status = 401
    code = "unauthenticated"


class EnrollmentRefusedError(RegistryError):
    status = 403
    code = "enrollment_refused"


class ClaimQuotaError(EnrollmentRefusedError):
    code = "claim_quota_exhausted"


class AlreadyEnrolledError(RegistryError):
    status = 409
    code = "already_enrolled"


class PayloadTooLargeError(RegistryError):
    status = 413
    code = "too_large"


class EnrollmentPendingError(RegistryError):
    """The enrollment awaits approval; ask again after ``retry_after_s`` (RFC 7030 4.2.3)."""

    status = 202
    code = "pending"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EnrollmentWebhookError(RegistryError):
    """The pre-enrollment webhook gave no decision: the enrollment is refused (fails closed)."""

    status = 503
    code = "webhook_failed"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
