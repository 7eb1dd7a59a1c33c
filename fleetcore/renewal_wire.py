"""The renewal wire format on ``devices/<id>/cert/renew`` and ``devices/<id>/cert/issued``
(DESIGN.md, "MQTT topics").

A device publishes on ``cert/renew`` (QoS 1) a PEM CSR or, once it has connected with its
renewed certificate, a confirm ``{"confirm": "<serial of the new certificate, lower-case
hex>"}`` (:func:`confirm_payload`) so that the registry can revoke the superseded
certificate. The registry answers on ``cert/issued`` with the new leaf certificate (PEM),
``{"confirmed": "<serial>"}`` (:func:`confirmed_payload`), or a JSON refusal
``{"error": "<code>", "message": "<why>"}`` whose code is one of :class:`RefusalCode`
(:func:`refusal_payload`). A device reads answers with :func:`parse_answer`; the codes in
:data:`RETRYABLE_REFUSALS` mean "ask again later".
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from cryptography import x509

from fleetcore.errors import CertfleetError

__all__ = [
    "RETRYABLE_REFUSALS",
    "AnswerError",
    "Confirmed",
    "RefusalCode",
    "Refusal",
    "confirm_payload",
    "confirmed_payload",
    "parse_answer",
    "refusal_payload",
]

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class RefusalCode(enum.StrEnum):
    """Why the registry refused a renewal (the ``error`` of the JSON refusal)."""

    #: The topic is not ``devices/<id>/cert/renew`` (counted only: there is no one to answer).
    BAD_TOPIC = "bad_topic"
    TOO_LARGE = "too_large"
    INVALID_CSR = "invalid_csr"
    IDENTITY_MISMATCH = "identity_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DECOMMISSIONED = "device_decommissioned"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    INTERNAL_ERROR = "internal_error"


#: Refusals that say "later": a device backs off (with jitter) and asks again.
RETRYABLE_REFUSALS = frozenset(
    {
        RefusalCode.RATE_LIMITED,
        RefusalCode.BUSY,
        RefusalCode.REGISTRY_UNAVAILABLE,
        RefusalCode.INTERNAL_ERROR,
    }
)


class AnswerError(CertfleetError):
    """An answer on ``cert/issued`` is neither a readable certificate nor a refusal."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal as the device receives it."""

    error: str
    message: str


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The registry recorded that the device uses the certificate with this serial."""

    serial: str


def confirm_payload(serial: str) -> bytes:
    """The confirm a device publishes after connecting with its renewed certificate."""
    return json.dumps({"confirm": serial.lower()}).encode()


def confirmed_payload(serial: str) -> bytes:
    """The registry's answer to a valid confirm."""
    return json.dumps({"confirmed": serial.lower()}).encode()


def refusal_payload(error: RefusalCode, message: str) -> bytes:
    """The JSON refusal the registry publishes on ``cert/issued``."""
    return json.dumps({"error": str(error), "message": message}).encode()


def parse_answer(payload: bytes) -> x509.Certificate | Confirmed | Refusal:
    """The certificate, confirmation or refusal in ``payload``; AnswerError otherwise."""
    if payload.lstrip().startswith(_PEM_CERTIFICATE):
        try:
            return x509.load_pem_x509_certificate(payload)
        except ValueError:
            raise AnswerError("the answer is not a readable certificate") from None
    try:
        body = json.loads(payload)
        if isinstance(body, dict) and "confirmed" in body:
            return Confirmed(str(body["confirmed"]).lower())
        return Refusal(str(body["error"]), str(body["message"]))
    except (ValueError, KeyError, TypeError):
        raise AnswerError("unreadable answer on cert/issued") from None
