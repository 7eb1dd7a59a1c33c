"""Certificates as relying parties ask about them: one serial's status (OCSP), the CRL's
entries (until their not_after + CLOCK_SKEW), when the first of them expires, the CRL's
number, and a delta CRL's entries (what the feed revoked since a base CRL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import Session, col, select

from factory.crl import RevokedEntry
from fleetcore.profile import CLOCK_SKEW
from fleetcore.reasons import DEFAULT_REASON_CODE, reason_flag
from registry.db import write_transaction
from registry.models import Certificate, Revocation
from registry.store import counters

__all__ = [
    "CertificateStatusInfo",
    "CrlContents",
    "all_certificates",
    "aware",
    "certificate_status",
    "crl_contents",
    "delta_contents",
    "device_certificate",
    "next_crl_expiry",
    "revoked_entries",
]


def revoked_entries(session: Session, now: dt.datetime) -> list[RevokedEntry]:
    """Revoked certificates that have not expired yet (expired ones need no CRL entry).

    A certificate stays listed until ``CLOCK_SKEW`` after its not_after: a relying party
    whose clock is behind by up to that margin still takes it for valid.
    """
    rows = session.exec(
        select(Certificate.serial, Certificate.revoked_at, Certificate.revocation_reason).where(
            Certificate.status == "revoked", col(Certificate.not_after) > now - CLOCK_SKEW
        )
    ).all()
    return _entries(rows, now)


def _entries(
    rows: Sequence[tuple[str, dt.datetime | None, str | None]], now: dt.datetime
) -> list[RevokedEntry]:
    """CRL entries of (serial, revoked_at, reason) rows, in the rows' order (no order is
    required: relying parties index the list themselves)."""
    flags = {reason: reason_flag(reason) for reason in {row[2] for row in rows}}
    return [
        RevokedEntry(serial=int(serial, 16), revoked_at=revoked_at or now, reason=flags[reason])
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


#: Serials per IN list (SQLite's bound-parameter limit is 999 in old builds).
_IN_CHUNK = 500


def delta_contents(session: Session, now: dt.datetime, base_head: int) -> CrlContents:
    """Allocate the next CRLNumber and read a delta CRL's entries, in one write transaction:
    the certificates revoked by feed events after ``base_head`` (the head its base CRL
    covers) and not yet expired. Reads the feed's tail and those serials' rows by primary
    key only: the cost grows with the changes since the base, not with the base.
    """
    with write_transaction(session):
        number = counters.bump(session, counters.CRL_NUMBER)
        head = counters.read(session, counters.REVOCATION_SEQ) or 0
        serials = sorted(
            {
                serial
                for event_serials in session.exec(
                    select(Revocation.serials).where(
                        col(Revocation.seq) > base_head, col(Revocation.seq) <= head
                    )
                ).all()
                for serial in event_serials
            }
        )
        rows: list[tuple[str, dt.datetime | None, str | None]] = []
        first: dt.datetime | None = None
        for start in range(0, len(serials), _IN_CHUNK):
            for serial, revoked_at, reason, not_after in session.exec(
                select(
                    Certificate.serial,
                    Certificate.revoked_at,
                    Certificate.revocation_reason,
                    Certificate.not_after,
                ).where(
                    col(Certificate.serial).in_(serials[start : start + _IN_CHUNK]),
                    Certificate.status == "revoked",
                )
            ).all():
                if aware(not_after) + CLOCK_SKEW <= now:
                    continue  # expired: it leaves the delta as it leaves the base
                rows.append((serial, revoked_at, reason))
                first = not_after if first is None else min(first, not_after)
    next_expiry = None if first is None else aware(first) + CLOCK_SKEW
    return CrlContents(number, head, _entries(rows, now), next_expiry)


def device_certificate(session: Session, device_id: str, serial: str) -> Certificate | None:
    """The certificate ``serial`` of ``device_id``; None when unknown or another device's."""
    row = session.get(Certificate, serial)
    return row if row is not None and row.device_id == device_id else None


def all_certificates(session: Session) -> list[Certificate]:
    """Every certificate registered, issued or re-enrolled (a run's report; not for a fleet)."""
    return list(session.exec(select(Certificate)).all())
