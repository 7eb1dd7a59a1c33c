"""What EST and claim enrollment refuse: the classes live in :mod:`registry.errors` (one tree
of every registry error); this module names them for the EST code that imports them here."""

from __future__ import annotations

from registry.errors import (
    AlreadyEnrolledError,
    ClaimQuotaError,
    EnrollmentPendingError,
    EnrollmentRefusedError,
    EnrollmentWebhookError,
    EstBadRequestError,
    EstRateLimitedError,
    EstUnauthorizedError,
    PayloadTooLargeError,
)

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
