"""The renewal answer's wire format on ``devices/<id>/cert/issued`` (DESIGN.md, "MQTT topics").

The registry answers a device's CSR with either the new leaf certificate (PEM) or a JSON
refusal ``{"error": "<code>", "message": "<why>"}`` whose code is one of
:class:`RefusalCode`. The registry builds answers with :func:`refusal_payload`; a device reads
them with :func:`parse_answer`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from cryptography import x509

from fleetcore.errors import CertfleetError

__all__ = ["AnswerError", "RefusalCode", "Refusal", "parse_answer", "refusal_payload"]

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


class AnswerError(CertfleetError):
    """An answer on ``cert/issued`` is neither a readable certificate nor a refusal."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal as the device receives it."""

    error: str
    message: str


def refusal_payload(error: RefusalCode, message: str) -> bytes:
    """The JSON refusal the registry publishes on ``cert/issued``."""
    return json.dumps({"error": str(error), "message": message}).encode()


def parse_answer(payload: bytes) -> x509.Certificate | Refusal:
    """The certificate or the refusal in ``payload``; AnswerError if it is neither."""
    if payload.lstrip().startswith(_PEM_CERTIFICATE):
        try:
            return x509.load_pem_x509_certificate(payload)
        except ValueError:
            raise AnswerError("the answer is not a readable certificate") from None
    try:
        refusal = json.loads(payload)
        return Refusal(str(refusal["error"]), str(refusal["message"]))
    except (ValueError, KeyError, TypeError):
        raise AnswerError("unreadable answer on cert/issued") from None
