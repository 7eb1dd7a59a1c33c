"""What EST and claim enrollment refuse; each a RegistryError with its HTTP status.

RegistryError (registry.errors)
 ├── EstBadRequestError        400  a body that is not base64 DER (PEM, binary), a bad CSR
 ├── EstUnauthorizedError      401  no credential (no client certificate, no HTTP Basic)
 ├── EnrollmentRefusedError    403  a credential that does not allow this: a claim revoked,
 │    │                             expired or unknown, a device outside the allow-list, a
 │    │                             CSR naming another identity, a used secret, a device
 │    │                             certificate where a claim is due and the reverse
 │    └── ClaimQuotaError      403  the claim's quota is used up
 ├── AlreadyEnrolledError      409  the device id or hardware serial is enrolled already
 ├── EstRateLimitedError       429  a re-enrollment within the renewal interval (Retry-After)
 ├── PayloadTooLargeError      413  a body over the limit
 ├── EnrollmentPendingError    202  the pre-enrollment webhook has not approved it yet
 │                                  (Retry-After; RFC 7030 4.2.3): not a refusal, not issued
 └── EnrollmentWebhookError    503  the pre-enrollment webhook did not answer in time or
                                    answered something else than a decision (fails closed)
"""

from __future__ import annotations

from registry.errors import RegistryError

__all__ = [
    "AlreadyEnrolledError",
    "ClaimQuotaError",
    "EnrollmentPendingError",
    "EnrollmentRefusedError",
    "EnrollmentWebhookError",
    "EstBadRequestError",
    "EstRateLimitedError",
    "EstUnauthorizedError",
    "PayloadTooLargeError",
]


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


class EstRateLimitedError(RegistryError):
    """``retry_after_s``: when the device may ask again (the Retry-After header)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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
