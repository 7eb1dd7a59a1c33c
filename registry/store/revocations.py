"""Decommission and the revocation feed: ordered, gap-free events, one per decommission.

The feed's sequence numbers come from the ``revocation_seq`` counter, incremented in the
decommission's own transaction; its epoch (:func:`feed_epoch`) tells readers when the
numbers start over (a database restored from an older copy). :func:`compact_feed` removes
the events of certificates long expired and raises the feed's floor; a reader below the
floor is told to catch up from :func:`revocation_snapshot`.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import String, delete, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.expression import Executable
from sqlmodel import Session, col, select

from fleetcore.clock import utcnow
from fleetcore.profile import CLOCK_SKEW
from fleetcore.reasons import DEFAULT_REASON_CODE
from fleetcore.revocation_feed import (
    DEFAULT_KINDS,
    FEED_KINDS,
    RevocationEvent,
    RevocationFeed,
    RevocationSnapshot,
)
from registry.db import write_transaction
from registry.errors import AlreadyDecommissionedError, NotFoundError
from registry.models import (
    REVOKED_ONLY,
    Certificate,
    Counter,
    DecommissionResult,
    Device,
    Revocation,
    UTCDateTime,
)
from registry.store import counters
from registry.store.audit import Actor, add_entry
from registry.store.devices import device_public

__all__ = [
    "FEED_CHANNEL",
    "FeedCompaction",
    "announce",
    "append_feed_event",
    "compact_feed",
    "decommission_device",
    "feed_epoch",
    "feed_floor",
    "head_seq",
    "redraw_feed_epoch",
    "revocation_snapshot",
    "revocations_after",
]

#: The PostgreSQL NOTIFY channel a committed revocation is announced on, to every replica's
#: listener (:mod:`registry.feed_listener`).
FEED_CHANNEL = "certfleet_feed"


def decommission_device(
    session: Session,
    device_id: str,
    reason: str,
    actor: Actor,
    reason_code: str = DEFAULT_REASON_CODE,
) -> DecommissionResult:
    """Decommission a device: revoke its live certificates, append one feed event and one
    audit entry, all in one transaction. Raises NotFoundError / AlreadyDecommissionedError.
    """
    with write_transaction(session):
        device = session.exec(
            select(Device).where(Device.device_id == device_id).with_for_update()
        ).one_or_none()
        if device is None:
            raise NotFoundError(f"device {device_id} is not registered")
        if device.status == "decommissioned":
            raise AlreadyDecommissionedError(
                f"device {device_id} was already decommissioned at "
                f"{device.decommissioned_at.isoformat() if device.decommissioned_at else '?'}; "
                "its certificates are revoked"
            )
        now = utcnow()
        # Filter on device_id only (a device has a handful of certificates): with the status
        # in the WHERE clause SQLite's planner may pick the (status, not_after) index and
        # scan every live certificate of the fleet.
        live = [
            c
            for c in session.exec(
                select(Certificate).where(Certificate.device_id == device_id)
            ).all()
            if c.status == "live"
        ]
        serials = sorted(c.serial for c in live)
        mark_revoked(session, live, now, reason_code)
        device.status = "decommissioned"
        device.decommissioned_at = now
        session.add(device)
        # The feed's sequence is taken last: its row lock serializes every decommission
        # until commit, so only what needs the number runs while it is held (the
        # certificate and device updates are written first).
        session.flush()
        seq = append_feed_event(
            session,
            subject=device_id,
            serials=serials,
            reason=reason,
            reason_code=reason_code,
            now=now,
            actor=actor,
        )
        add_entry(
            session,
            actor,
            "decommission",
            device_id,
            {"reason": reason, "reason_code": reason_code, "serials": serials, "seq": seq},
        )
        announce(session, seq)
    public = device_public(session, device)
    return DecommissionResult(**public.model_dump(), revocation_seq=seq)


def mark_revoked(
    session: Session, certificates: Sequence[Certificate], now: dt.datetime, reason_code: str
) -> None:
    """Mark ``certificates`` revoked at ``now`` for ``reason_code`` (in the caller's
    transaction; the feed event is :func:`append_feed_event`)."""
    for certificate in certificates:
        certificate.status = "revoked"
        certificate.revoked_at = now
        certificate.revocation_reason = reason_code
        session.add(certificate)


def append_feed_event(
    session: Session,
    *,
    subject: str,
    serials: list[str],
    reason: str,
    reason_code: str,
    now: dt.datetime,
    actor: Actor,
    kind: str = "decommission",
) -> int:
    """Append the next event of the revocation feed in the caller's transaction; its seq.
    ``subject`` is the device id (an issuing CA's key id for ``issuer_revoked``). The
    counter's row lock is held until commit: take it last."""
    seq = counters.bump(session, counters.REVOCATION_SEQ)
    session.add(
        Revocation(
            seq=seq,
            device_id=subject,
            serials=serials,
            reason=reason,
            reason_code=reason_code,
            revoked_at=now,
            operator=actor.who[:256],
            kind=kind,
        )
    )
    return seq


def announce(session: Session, seq: int) -> None:
    """Tell every replica's feed listener of event ``seq`` (PostgreSQL NOTIFY, sent when and
    only if the transaction commits; nothing on SQLite, where there is one process)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :seq)"), {"channel": FEED_CHANNEL, "seq": str(seq)}
        )


def _draw_epoch() -> int:
    return secrets.randbelow(2**31 - 2) + 1


def feed_epoch(session: Session) -> int:
    """This database's feed epoch, drawn (and committed) by the first reader that needs it."""
    value = counters.read(session, counters.FEED_EPOCH)
    if value is not None:
        return value
    try:
        with write_transaction(session):
            session.add(Counter(name=counters.FEED_EPOCH, value=_draw_epoch()))
    except IntegrityError:  # another reader drew it first: theirs stands
        pass
    value = counters.read(session, counters.FEED_EPOCH)
    assert value is not None
    return value


def redraw_feed_epoch(session: Session) -> int:
    """Give the feed a new epoch (the database was restored: its sequence numbers repeat
    ones readers have seen, so readers must start over); returns it."""
    with write_transaction(session):
        counter = session.exec(
            select(Counter).where(Counter.name == counters.FEED_EPOCH).with_for_update()
        ).one_or_none()
        if counter is None:
            counter = Counter(name=counters.FEED_EPOCH, value=0)
        old = counter.value
        while counter.value == old:
            counter.value = _draw_epoch()
        session.add(counter)
        epoch = counter.value
    return epoch


def head_seq(session: Session) -> int:
    """The highest revocation sequence number stored (0 when none)."""
    return counters.read(session, counters.REVOCATION_SEQ) or 0


def feed_floor(session: Session) -> int:
    """The highest sequence number compacted away (0 when none)."""
    return counters.read(session, counters.FEED_FLOOR) or 0


def revocations_after(
    session: Session,
    after: int,
    limit: int,
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> RevocationFeed:
    """Feed events with ``seq > after`` of the given kinds, each with its serials' not_after.

    The head is read first (every event up to it is committed: the counter and the event
    commit together): when fewer than ``limit`` events match, every event up to the head
    has been scanned and ``last_seq`` is at least the head (an answer of filtered kinds
    moves the cursor past the events it left out). A reader whose ``after`` is below the
    feed's floor gets no events and ``snapshot_required``: the floor is read after the
    events, so a compaction that removed some of them is always seen.
    """
    head = head_seq(session)
    query = (
        select(Revocation)
        .where(col(Revocation.seq) > after)
        .order_by(col(Revocation.seq))
        .limit(limit)
    )
    if set(kinds) != set(FEED_KINDS):
        query = query.where(col(Revocation.kind).in_(list(kinds)))
    rows = session.exec(query).all()
    if after < feed_floor(session):
        return RevocationFeed(
            events=[],
            last_seq=after,
            head_seq=head,
            epoch=feed_epoch(session),
            snapshot_required=True,
        )
    expiry = _not_after_of(session, [s for r in rows for s in r.serials])
    events = [
        RevocationEvent(
            seq=r.seq,
            device_id=r.device_id,
            serials=list(r.serials),
            reason=r.reason,
            reason_code=r.reason_code,  # type: ignore[arg-type]
            revoked_at=r.revoked_at,
            kind=r.kind,  # type: ignore[arg-type]
            not_after={s: expiry[s] for s in r.serials if s in expiry},
            issuer=r.device_id if r.kind == "issuer_revoked" else None,
        )
        for r in rows
    ]
    complete = len(rows) < limit
    return RevocationFeed(
        events=events,
        last_seq=max(after, head, rows[-1].seq if rows else 0) if complete else rows[-1].seq,
        head_seq=head,
        epoch=feed_epoch(session),
    )


#: Serials per IN list (SQLite's bound-parameter limit is 999 in old builds).
_IN_CHUNK = 500


def _not_after_of(session: Session, serials: Sequence[str]) -> dict[str, dt.datetime]:
    found: dict[str, dt.datetime] = {}
    unique = sorted(set(serials))
    for start in range(0, len(unique), _IN_CHUNK):
        chunk = unique[start : start + _IN_CHUNK]
        found.update(
            session.exec(
                select(Certificate.serial, Certificate.not_after).where(
                    col(Certificate.serial).in_(chunk)
                )
            ).all()
        )
    return found


@dataclass(frozen=True)
class FeedCompaction:
    """What :func:`compact_feed` did: events removed, the floor and head after it."""

    removed: int
    floor: int
    head_seq: int


def compact_feed(session: Session, older_than: dt.datetime, batch: int = 2000) -> FeedCompaction:
    """Remove the feed events revoked before ``older_than`` whose certificates all expired
    before it (``issuer_revoked`` events stay: an issuing CA outlives its certificates).

    The other events keep their sequence numbers; the floor (the highest number removed)
    is raised in the same transaction as each batch's removal, so no reader ever misses an
    event without being told (:func:`revocations_after`). One write transaction per
    ``batch`` events read, never one over the whole feed.
    """
    removed, last = 0, 0
    head = head_seq(session)
    while True:
        rows = session.exec(
            select(Revocation.seq, Revocation.serials, Revocation.kind, Revocation.revoked_at)
            .where(col(Revocation.seq) > last, col(Revocation.seq) <= head)
            .order_by(col(Revocation.seq))
            .limit(batch)
        ).all()
        if not rows:
            break
        last = rows[-1][0]
        expiry = _not_after_of(session, [s for r in rows for s in r[1]])
        doomed = [
            seq
            for seq, serials, kind, revoked_at in rows
            if kind != "issuer_revoked"
            and revoked_at < older_than
            and all(s in expiry and expiry[s] < older_than for s in serials)
        ]
        if not doomed:
            continue
        with write_transaction(session):
            for start in range(0, len(doomed), _IN_CHUNK):
                chunk = doomed[start : start + _IN_CHUNK]
                session.execute(delete(Revocation).where(col(Revocation.seq).in_(chunk)))
            _raise_floor(session, doomed[-1])
        removed += len(doomed)
    return FeedCompaction(removed=removed, floor=feed_floor(session), head_seq=head)


def _raise_floor(session: Session, seq: int) -> None:
    counter = session.exec(
        select(Counter).where(Counter.name == counters.FEED_FLOOR).with_for_update()
    ).one_or_none()
    if counter is None:
        session.add(Counter(name=counters.FEED_FLOOR, value=seq))
    elif counter.value < seq:
        counter.value = seq
        session.add(counter)


_REVOKED_PAGE = (
    "SELECT serial, not_after FROM certificate WHERE status = 'revoked'"
    " AND serial > :after ORDER BY serial LIMIT :limit"
)
_REVOKED_PAGE_SQLITE = (
    "SELECT serial, not_after FROM certificate INDEXED BY ix_certificate_revoked_serial"
    " WHERE status = 'revoked' AND serial > :after ORDER BY serial LIMIT :limit"
)
# the partial index's own condition, word for word (a planner matches its text)
assert REVOKED_ONLY in _REVOKED_PAGE and REVOKED_ONLY in _REVOKED_PAGE_SQLITE


def _revoked_page(session: Session) -> Executable:
    """The revoked serials above ``:after`` in serial order, ``:limit`` at most, with their
    not_after: a range of the partial index ``ix_certificate_revoked_serial`` (no table row
    read; expired ones are left out by the caller). SQLite's planner, without statistics,
    would take the (status, not_after) index and sort, so SQLite is told the index."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    return text(_REVOKED_PAGE_SQLITE if sqlite else _REVOKED_PAGE).columns(
        serial=String, not_after=UTCDateTime
    )


def revocation_snapshot(
    session: Session,
    now: dt.datetime | None = None,
    *,
    after_serial: str = "",
    limit: int | None = None,
) -> RevocationSnapshot:
    """The live revoked state for a follower below the floor (or far behind): every revoked
    serial whose certificate has not expired (plus :data:`CLOCK_SKEW`) with its not_after,
    every decommissioned device, every revoked issuing CA; and the head it covers.

    The head is read first: what is read after it includes every event up to it (and maybe
    some above, which the follower applies again from the tail: harmless). Paged with
    ``limit``: the serials above ``after_serial`` in serial order, ``limit`` at most, and
    ``next_after`` set when more follow; devices and issuing CAs on the first page only.
    """
    now = now or utcnow()
    head = head_seq(session)
    epoch = feed_epoch(session)
    floor = feed_floor(session)
    expired_before = now - CLOCK_SKEW
    next_after = None
    if limit is None:
        serials = list(
            session.exec(
                select(Certificate.serial, Certificate.not_after).where(
                    col(Certificate.status) == "revoked",
                    col(Certificate.not_after) > expired_before,
                )
            ).all()
        )
    else:
        page = session.execute(
            _revoked_page(session), {"after": after_serial, "limit": limit}
        ).all()
        if len(page) == limit:
            next_after = page[-1][0]
        serials = [(serial, when) for serial, when in page if when > expired_before]
    first_page = not after_serial
    devices = (
        session.exec(
            select(Device.device_id)
            .where(col(Device.status) == "decommissioned")
            .order_by(col(Device.device_id))
        ).all()
        if first_page
        else []
    )
    issuers = (
        session.exec(
            select(Revocation.device_id)
            .where(col(Revocation.kind) == "issuer_revoked")
            .order_by(col(Revocation.seq))
        ).all()
        if first_page
        else []
    )
    # Built without validation (the values come from the database as the model has them):
    # at a million devices the snapshot holds hundreds of thousands of serials.
    return RevocationSnapshot.model_construct(
        head_seq=head,
        epoch=epoch,
        floor=floor,
        read_at=now,
        not_after={serial.lower(): when for serial, when in serials},
        devices=list(devices),
        issuers=[key_id.lower() for key_id in dict.fromkeys(issuers)],
        next_after=next_after,
    )
