"""Errors the broker raises on purpose.

CertfleetError
 └── BrokerError            the broker cannot start or run as configured
      └── RevocationStateError   the persisted revoked set cannot be read or written
"""

from __future__ import annotations

from fleetcore.errors import CertfleetError

__all__ = ["BrokerError", "RevocationStateError"]


class BrokerError(CertfleetError):
    """The broker cannot start or run as configured."""


class RevocationStateError(BrokerError):
    """The persisted revoked set is unreadable or cannot be written."""
