"""The renewal messages a device sends and reads (DESIGN.md, "MQTT topics"), device side.

On ``devices/<id>/cert/renew`` (QoS 1) a device publishes a PEM CSR, or, once it has
connected with its renewed certificate, a confirm ``{"confirm": "<serial, lower-case hex>"}``
so that the registry can revoke the superseded certificate. On ``devices/<id>/cert/issued``
the registry answers with the new leaf certificate (PEM), ``{"confirmed": "<serial>"}``, or a
refusal ``{"error": "<code>", "message": "<why>"}``.

This belongs in the shared ``fleetcore.renewal_wire`` (the refusal codes and the answer
format, being created by the kernel work); it lives here until that module is on main, and
then moves there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography import x509

from device_sim.errors import SimError

__all__ = [
    "RETRYABLE_REFUSALS",
    "AnswerError",
    "Confirmed",
    "Refusal",
    "confirm_payload",
    "parse_answer",
]

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"

#: Refusals that say "later": the device backs off (with jitter) and asks again.
RETRYABLE_REFUSALS = frozenset({"rate_limited", "busy", "registry_unavailable", "internal_error"})


class AnswerError(SimError):
    """An answer on ``cert/issued`` is neither a certificate, a confirmation nor a refusal."""


@dataclass(frozen=True, slots=True)
class Refusal:
    error: str
    message: str


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The registry recorded that the device uses the certificate with this serial."""

    serial: str


def confirm_payload(serial: str) -> bytes:
    """The confirm a device publishes after connecting with its renewed certificate."""
    return json.dumps({"confirm": serial.lower()}).encode()


def parse_answer(payload: bytes) -> x509.Certificate | Confirmed | Refusal:
    """What the registry said on ``cert/issued``; AnswerError if it is none of the three."""
    if payload.lstrip().startswith(_PEM_CERTIFICATE):
        try:
            return x509.load_pem_x509_certificate(payload)
        except ValueError:
            raise AnswerError("the answer is not a readable certificate") from None
    try:
        body = json.loads(payload)
        if "confirmed" in body:
            return Confirmed(str(body["confirmed"]).lower())
        return Refusal(str(body["error"]), str(body["message"]))
    except (ValueError, KeyError, TypeError):
        raise AnswerError("unreadable answer on cert/issued") from None
