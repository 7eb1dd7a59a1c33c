"""The renewal answer's wire format on ``devices/<id>/cert/issued`` (DESIGN.md, "MQTT topics").

The registry answers a device's CSR with either the new leaf certificate (PEM, followed by the
certificate of the issuing CA that signed it: after a rollover the device learns the new
issuing CA from it, :func:`answer_issuers`) or a JSON
refusal ``{"error": "<code>", "message": "<why>"}`` whose code is one of
:class:`RefusalCode`. The registry builds answers with :func:`refusal_payload`; a device reads
every answer (certificate, confirmation, refusal) with :func:`parse_answer`; the codes in
:data:`RETRYABLE_REFUSALS` mean "ask again later".

The confirm (issue 14, docs/lifecycle.md): once connected with its renewed certificate, a
device publishes ``{"confirm": "<serial, lower-case hex>"}`` (:func:`confirm_payload`) on the
same ``cert/renew`` topic as its CSRs (:func:`is_confirm` tells them apart); the registry
answers ``{"confirmed": "<serial>"}`` (:func:`confirmed_payload`) or a refusal.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from cryptography import x509

from fleetcore.errors import AnswerError, ConfirmError

__all__ = [
    "MAX_CONFIRM_BYTES",
    "RETRYABLE_REFUSALS",
    "AnswerError",
    "ConfirmError",
    "Confirmed",
    "RefusalCode",
    "Refusal",
    "confirm_payload",
    "confirmed_payload",
    "is_confirm",
    "is_renew_now",
    "renew_now_payload",
    "answer_issuers",
    "parse_answer",
    "parse_confirm",
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
    #: Refusals of a confirm (``{"confirm": "<serial>"}``, docs/lifecycle.md).
    INVALID_CONFIRM = "invalid_confirm"
    UNKNOWN_SERIAL = "unknown_serial"
    CERTIFICATE_REVOKED = "certificate_revoked"
    NOT_NEWEST = "not_newest"


#: Refusals that say "later": a device backs off (with jitter) and asks again.
RETRYABLE_REFUSALS = frozenset(
    {
        RefusalCode.RATE_LIMITED,
        RefusalCode.BUSY,
        RefusalCode.REGISTRY_UNAVAILABLE,
        RefusalCode.INTERNAL_ERROR,
    }
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal as the device receives it."""

    error: str
    message: str


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


#: An operator's "renew now" (issue 26), published by the registry on a device's
#: ``cert/issued`` topic: the device renews at once instead of at its due time (after an
#: issuing CA rollover, to move a set of devices to the new one).
_RENEW_NOW = b'{"renew": "now"}'


def renew_now_payload() -> bytes:
    return _RENEW_NOW


def is_renew_now(payload: bytes) -> bool:
    """A payload on ``cert/issued`` is a renew-now notice (not an answer to a request)."""
    return payload.strip() == _RENEW_NOW


def answer_issuers(payload: bytes) -> list[x509.Certificate]:
    """The certificates after the leaf in a certificate answer (the issuing CA); [] when
    there are none or the answer is no certificate."""
    if not payload.lstrip().startswith(_PEM_CERTIFICATE):
        return []
    try:
        return x509.load_pem_x509_certificates(payload)[1:]
    except ValueError:
        return []


# -- the confirm: a renewed device says it connected with its new certificate ---------------

#: Largest confirm payload the registry reads.
MAX_CONFIRM_BYTES = 256
_SERIAL = re.compile(r"^[0-9a-f]{1,48}$")


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The registry's answer to a valid confirm: the serial it recorded."""

    serial: str


def is_confirm(payload: bytes) -> bool:
    """A payload on ``cert/renew`` is a confirm (JSON) rather than a CSR (PEM)."""
    return payload.lstrip()[:1] == b"{"


def confirm_payload(serial: str) -> bytes:
    """What a device publishes on ``devices/<id>/cert/renew`` once connected with the
    certificate ``serial`` (lower-case hex, :func:`fleetcore.profile.serial_hex`)."""
    return json.dumps({"confirm": serial.lower()}).encode()


def parse_confirm(payload: bytes) -> str:
    """The serial of a confirm payload (lower-case); ConfirmError for anything else."""
    if len(payload) > MAX_CONFIRM_BYTES:
        raise ConfirmError(f"confirm of {len(payload)} bytes exceeds {MAX_CONFIRM_BYTES}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ConfirmError("confirm is not JSON") from None
    serial = body.get("confirm") if isinstance(body, dict) else None
    if not isinstance(serial, str) or not _SERIAL.fullmatch(serial.lower()):
        raise ConfirmError(
            'confirm must be {"confirm": "<serial of the new certificate, lower-case hex>"}'
        )
    return serial.lower()


def confirmed_payload(serial: str) -> bytes:
    """The registry's answer on ``cert/issued`` to a valid confirm."""
    return json.dumps({"confirmed": serial}).encode()
