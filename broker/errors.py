"""Errors the broker raises on purpose.

CertfleetError
 └── BrokerError            the broker cannot start or run as configured
      ├── BrokerTlsError         its TLS certificate, key or CA file is missing or unusable
      └── RevocationStateError   the persisted revoked set cannot be read or written
"""

from __future__ import annotations

from fleetcore.errors import CertfleetError

__all__ = ["BrokerError", "BrokerTlsError", "RevocationStateError"]


class BrokerError(CertfleetError):
    """The broker cannot start or run as configured."""


class BrokerTlsError(BrokerError):
    """A TLS certificate, key or CA file of the broker is missing or unusable."""


class RevocationStateError(BrokerError):
    """The persisted revoked set is unreadable or cannot be written."""
