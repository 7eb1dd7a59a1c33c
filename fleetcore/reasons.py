"""Revocation reason codes: the RFC 5280 CRLReason values a decommission may give.

The name is what the API takes and the feed carries (RFC 5280 spelling); the same name
maps to the x509 CRLReason of the CRL entry and to the OCSP revocationReason.

Allowed, because each can describe why one device's certificates end:
``unspecified``, ``keyCompromise``, ``affiliationChanged``, ``superseded``,
``cessationOfOperation`` (the default: the device is retired), ``privilegeWithdrawn``.

Refused: ``certificateHold`` and ``removeFromCRL`` (a decommission is final, there is no
hold to lift), ``cACompromise`` and ``aACompromise`` (they describe a CA or an attribute
authority, not a device: a compromised CA is a CA rotation, not a decommission).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from cryptography import x509

__all__ = ["DEFAULT_REASON_CODE", "REASON_CODES", "ReasonCode", "reason_flag"]

ReasonCode = Literal[
    "unspecified",
    "keyCompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
]

REASON_CODES: Final[tuple[str, ...]] = get_args(ReasonCode)
DEFAULT_REASON_CODE: Final[ReasonCode] = "cessationOfOperation"

_FLAGS: Final[dict[str, x509.ReasonFlags]] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}


def reason_flag(code: str | None) -> x509.ReasonFlags:
    """The x509 CRLReason of ``code`` (None, from rows older than reason codes: the default)."""
    return _FLAGS[code or DEFAULT_REASON_CODE]
