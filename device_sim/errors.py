"""What the device simulator refuses, and how a device classifies a failed connection.

    CertfleetError
     └── SimError               the simulator cannot run as asked
          ├── BundleError       a device bundle is missing, incomplete or unreadable
          ├── EstEnrollmentError       one device's EST enrollment was refused or failed
          ├── RenewalRefusedError      the registry refused a renewal CSR (its code)
          ├── CertificateExpiredError  the certificate expired: no renewal over MQTT
          └── RenewalFailedError       no answer to a renewal (broker or registry)

A failed connection is not an exception: it is a :class:`Failure` with a reason (a short
snake_case word counted in the summary) and whether it is permanent (the device stops) or
transient (the device backs off and reconnects).
"""

from __future__ import annotations

import errno
import ssl
from dataclasses import dataclass

from fleetcore.errors import CertfleetError

__all__ = [
    "BundleError",
    "CertificateExpiredError",
    "EstEnrollmentError",
    "Failure",
    "RenewalFailedError",
    "RenewalRefusedError",
    "SimError",
    "classify_connack",
    "classify_os_error",
]


class SimError(CertfleetError):
    """The simulator cannot run as asked."""


class BundleError(SimError):
    """A device bundle is missing, incomplete or unreadable."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a connection failed or ended, and whether retrying could help."""

    reason: str
    permanent: bool
    detail: str = ""


# TLS alerts a server sends about OUR certificate: retrying with the same certificate cannot
# help, so the device stops (what real firmware should do instead of hammering the broker).
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate_revoked",
    "TLSV1_ALERT_UNKNOWN_CA": "certificate_unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate_expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "certificate_rejected",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "certificate_rejected",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate_rejected",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate_rejected",
    "TLSV1_ALERT_ACCESS_DENIED": "certificate_rejected",
}

# CONNACK refusals. paho 2 reports MQTT 3.1.1 return codes (1..5) as MQTT 5 reason codes
# (0x84..0x88); both spellings are accepted.
_CONNACK = {
    0x84: Failure("connack_unacceptable_protocol", permanent=True),
    0x85: Failure("connack_identifier_rejected", permanent=True),
    0x86: Failure("connack_bad_credentials", permanent=True),
    0x87: Failure("connack_not_authorized", permanent=True),
    0x88: Failure("connack_server_unavailable", permanent=False),
    0x8A: Failure("connack_banned", permanent=True),
    0x8C: Failure("connack_bad_authentication_method", permanent=True),
}
_MQTT311_TO_V5 = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}


def classify_connack(return_code: int) -> Failure:
    """A refused CONNACK: identity refusals are permanent, 'server unavailable' is not."""
    known = _CONNACK.get(_MQTT311_TO_V5.get(return_code, return_code))
    if known is not None:
        return known
    return Failure("connack_refused", permanent=False, detail=f"rc={return_code}")


def classify_os_error(exc: BaseException) -> Failure:
    """A socket or TLS error seen while connecting or reading."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        # We do not trust the server: a wrong root.crt or a wrong broker address.
        detail = str(getattr(exc, "verify_message", "") or exc)
        return Failure("server_certificate_untrusted", permanent=True, detail=detail)
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", None) or "")
        word = _CLIENT_CERT_ALERTS.get(reason)
        if word is not None:
            return Failure(word, permanent=True, detail=reason)
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return Failure("server_certificate_untrusted", permanent=True, detail=reason)
        return Failure("tls_error", permanent=False, detail=reason or type(exc).__name__)
    if isinstance(exc, TimeoutError):
        return Failure("connect_timeout", permanent=False)
    if isinstance(exc, ConnectionRefusedError):
        return Failure("connection_refused", permanent=False)
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return Failure("connection_reset", permanent=False)
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return Failure("too_many_open_files", permanent=False, detail=str(exc))
    return Failure("connection_error", permanent=False, detail=f"{type(exc).__name__}: {exc}")


class EstEnrollmentError(SimError):
    """One device's enrollment was refused or failed; the message is its one line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RenewalRefusedError(SimError):
    """The registry refused the CSR; ``error`` is its code (e.g. ``rate_limited``)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class CertificateExpiredError(SimError):
    """The device's certificate has expired: it cannot renew over MQTT any more."""


class RenewalFailedError(SimError):
    """No answer: the broker could not be reached or used, or the registry did not answer
    in time (the bundle is left as it was)."""
