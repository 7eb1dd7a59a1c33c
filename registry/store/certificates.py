"""Certificates as relying parties ask about them: one serial's status (OCSP), the CRL's
entries (until their not_after + CLOCK_SKEW), when the first of them expires, and the CRL's
number."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import Session, col, select

from factory.ca import RevokedEntry
from fleetcore.profile import CLOCK_SKEW
from fleetcore.reasons import DEFAULT_REASON_CODE, reason_flag
from registry.db import write_transaction
from registry.models import Certificate
from registry.store import counters

__all__ = [
    "CertificateStatusInfo",
    "CrlContents",
    "aware",
    "certificate_status",
    "crl_contents",
    "next_crl_expiry",
    "revoked_entries",
]


def revoked_entries(session: Session, now: dt.datetime) -> list[RevokedEntry]:
    """Revoked certificates that have not expired yet (expired ones need no CRL entry).

    A certificate stays listed until ``CLOCK_SKEW`` after its not_after: a relying party
    whose clock is behind by up to that margin still takes it for valid.
    """
    rows = session.exec(
        select(Certificate.serial, Certificate.revoked_at, Certificate.revocation_reason)
        .where(Certificate.status == "revoked", col(Certificate.not_after) > now - CLOCK_SKEW)
        .order_by(col(Certificate.serial))
    ).all()
    return [
        RevokedEntry(
            serial=int(serial, 16), revoked_at=revoked_at or now, reason=reason_flag(reason)
        )
        for serial, revoked_at, reason in rows
    ]


def next_crl_expiry(session: Session, now: dt.datetime) -> dt.datetime | None:
    """When the first CRL entry expires (not_after + CLOCK_SKEW of the earliest revoked
    certificate still listed); None when the CRL lists nothing."""
    first = session.exec(
        select(func.min(Certificate.not_after)).where(
            Certificate.status == "revoked", col(Certificate.not_after) > now - CLOCK_SKEW
        )
    ).one()
    return None if first is None else aware(first) + CLOCK_SKEW


def aware(value: dt.datetime | str) -> dt.datetime:
    """An aggregate's datetime as aware UTC (SQLite may hand back naive or text)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class CertificateStatusInfo:
    """What an OCSP responder needs of one serial: good or revoked, when and why."""

    serial: str
    device_id: str
    status: str
    revoked_at: dt.datetime | None
    reason_code: str | None


def certificate_status(session: Session, serial: str) -> CertificateStatusInfo | None:
    """The status of certificate ``serial`` (serial_hex form); None when it is not ours."""
    row = session.get(Certificate, serial)
    if row is None:
        return None
    return CertificateStatusInfo(
        row.serial,
        row.device_id,
        row.status,
        row.revoked_at,
        (row.revocation_reason or DEFAULT_REASON_CODE) if row.status == "revoked" else None,
    )


@dataclass(frozen=True, slots=True)
class CrlContents:
    """What one CRL is signed from: its number, the feed head it covers, its entries."""

    crl_number: int
    head_seq: int
    entries: list[RevokedEntry]
    #: when the first entry leaves the CRL (its not_after + CLOCK_SKEW); None: none listed.
    next_expiry: dt.datetime | None = None


def crl_contents(session: Session, now: dt.datetime) -> CrlContents:
    """Allocate the next CRLNumber and read what that CRL lists, in one write transaction.

    The number is taken first, under the counter's row lock held to the commit: a replica
    allocating the next number waits, then reads at least what this one read, so a higher
    number never lists less (monotonic across restarts and registry processes). The head
    is read before the entries: the entries include every revocation up to it.
    """
    with write_transaction(session):
        number = counters.bump(session, counters.CRL_NUMBER)
        head = counters.read(session, counters.REVOCATION_SEQ) or 0
        entries = revoked_entries(session, now)
        next_expiry = next_crl_expiry(session, now)
    return CrlContents(number, head, entries, next_expiry)
