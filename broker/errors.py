"""Errors the broker raises on purpose.

CertfleetError
 └── BrokerError            the broker cannot start or run as configured, or refuses
      ├── BrokerTlsError         its TLS certificate, key or CA file is missing or unusable
      ├── RevocationStateError   the persisted revoked set cannot be read or written
      ├── RefusedError           a client is refused (in the handshake or at CONNECT)
      ├── PacketTooLargeError    a client announced a packet over the limit (also a
      │                          ConnectionError: amqtt closes the connection on it)
      ├── StateFileError         a broker state file cannot be used (also a ValueError)
      └── SharedSubscriptionError  a ``$share`` filter is malformed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetcore.errors import CertfleetError

if TYPE_CHECKING:
    from broker.auth import Refusal

__all__ = [
    "CONNACK_NOT_AUTHORIZED",
    "BrokerError",
    "BrokerTlsError",
    "PacketTooLargeError",
    "RefusedError",
    "RevocationStateError",
    "SharedSubscriptionError",
    "StateFileError",
]


class BrokerError(CertfleetError):
    """The broker cannot start or run as configured."""


class BrokerTlsError(BrokerError):
    """A TLS certificate, key or CA file of the broker is missing or unusable."""


class RevocationStateError(BrokerError):
    """The persisted revoked set is unreadable or cannot be written."""


#: The CONNACK return code of a refused client unless the refusal says otherwise (MQTT 3.1.1).
CONNACK_NOT_AUTHORIZED = 0x05


class RefusedError(BrokerError):
    """A client is refused; ``reason`` is counted, ``detail`` is logged, ``connack`` is the
    CONNACK return code answered when the refusal happens at CONNECT."""

    def __init__(
        self, reason: Refusal, detail: str, *, connack: int = CONNACK_NOT_AUTHORIZED
    ) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.connack = connack


class PacketTooLargeError(BrokerError, ConnectionError):
    """A client announced a packet larger than the broker accepts."""


class StateFileError(BrokerError, ValueError):
    """A state file that cannot be used (the reason says why)."""


class SharedSubscriptionError(BrokerError):
    """A ``$share`` filter is malformed (refused with SUBACK 0x80)."""
