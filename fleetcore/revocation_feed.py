"""The revocation feed's wire format, shared by the registry (which serves it) and the broker
(which follows it): ``GET /api/v1/revocations?after=&wait=&limit=&kinds=``.

Pure pydantic, so the broker reads the feed without importing the registry's database code.

Event kinds (issue 14). ``decommission`` (the only kind before): the device is decommissioned,
every serial it held is revoked, and a follower drops every live session of the device.
``superseded``: a renewed device confirmed its new certificate, so the listed *older* serials
are revoked; the device stays active and a follower drops only the sessions presenting those
serials, never the device's session with its new certificate.

Compatibility. A follower that does not ask for ``kinds`` is served ``decommission`` events
only (a follower written before kinds existed would take a superseded event for a
decommission and cut the device off); sequence numbers then have gaps, which such followers
never checked. A follower that understands kinds asks ``kinds=decommission,superseded``
(:data:`FOLLOWER_KINDS`). ``not_after`` (serial -> its certificate's not_after) is optional:
with it, a follower may forget a revoked serial once it has expired (plus the clock-skew
margin, :data:`fleetcore.profile.CLOCK_SKEW`); a serial without it is kept for good.
Followers ignore fields they do not know (pydantic's default), so both fields are additive.

``issuer_revoked`` (issue 26, ``certfleet ca revoke-issuing``): an issuing CA was revoked by
the root; ``issuer`` is its key id (hex of its Subject Key Identifier), ``serials`` every
certificate of it that was live (now revoked), ``device_id`` the key id again. A follower
refuses every certificate whose Authority Key Identifier is that key id, registered or not,
and drops the sessions of those serials.

Compaction (``certfleet registry feed-compact``). Events whose certificates all expired long
ago leave the feed; the other events keep their sequence numbers, and the feed's ``floor``
is the highest number removed. A follower whose position is below the floor cannot tell
what it missed: the feed answers it at once with ``snapshot_required`` (no events); it then
reads ``GET /api/v1/revocations/snapshot`` (:class:`RevocationSnapshot`: the live revoked
state, read at or after ``head_seq``), adds all of it, and follows the tail from that head.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Final, Literal, get_args

from pydantic import AfterValidator, BaseModel, Field

from fleetcore.reasons import DEFAULT_REASON_CODE, ReasonCode

__all__ = [
    "DEFAULT_KINDS",
    "FEED_BATCH_DEFAULT",
    "FEED_BATCH_MAX",
    "FEED_KINDS",
    "FOLLOWER_KINDS",
    "KINDS_PATTERN",
    "EventKind",
    "RevocationEvent",
    "RevocationFeed",
    "RevocationSnapshot",
    "parse_kinds",
]

#: Events per answer when the follower does not say (``limit``), and the most it may ask for.
FEED_BATCH_DEFAULT: Final = 1000
FEED_BATCH_MAX: Final = 5000

EventKind = Literal["decommission", "superseded", "issuer_revoked"]
FEED_KINDS: Final[tuple[str, ...]] = get_args(EventKind)
#: What a follower that does not send ``kinds`` gets (followers older than kinds).
DEFAULT_KINDS: Final[tuple[str, ...]] = ("decommission",)
#: The ``kinds`` query value of a follower that understands every kind.
FOLLOWER_KINDS: Final = ",".join(FEED_KINDS)
#: What a ``kinds`` query value may be: known kinds, comma-separated.
KINDS_PATTERN: Final = "^({0})(,({0}))*$".format("|".join(FEED_KINDS))


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; every time the feed carries is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _lower(serials: list[str]) -> list[str]:
    return [s.lower() for s in serials]


def _aware_map(values: dict[str, dt.datetime]) -> dict[str, dt.datetime]:
    return {serial.lower(): _aware(when) for serial, when in values.items()}


def parse_kinds(value: str | None) -> tuple[str, ...]:
    """The ``kinds`` query value -> the kinds asked for; ValueError names an unknown one."""
    if not value:
        return DEFAULT_KINDS
    kinds = tuple(dict.fromkeys(k.strip() for k in value.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in FEED_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"unknown feed event kind(s) {', '.join(unknown) or repr(value)}; "
            f"known: {', '.join(FEED_KINDS)}"
        )
    return kinds


class RevocationEvent(BaseModel):
    """One revocation: a decommission (the device and every serial it held) or the
    supersession of a renewed device's older serials (lower-case hex)."""

    seq: int
    device_id: str
    serials: Annotated[list[str], AfterValidator(_lower)]
    reason: str
    reason_code: ReasonCode = DEFAULT_REASON_CODE
    revoked_at: Annotated[dt.datetime, AfterValidator(_aware)]
    kind: EventKind = "decommission"
    #: serial -> not_after of its certificate (optional; absent: keep the serial for good).
    not_after: Annotated[dict[str, dt.datetime], AfterValidator(_aware_map)] = Field(
        default_factory=dict
    )
    #: ``issuer_revoked`` only: the revoked issuing CA's key id (lower-case hex).
    issuer: str | None = None


class RevocationFeed(BaseModel):
    """One answer of the feed: events after the cursor, the cursor to ask from next."""

    events: list[RevocationEvent]
    last_seq: int
    head_seq: int
    #: Random per database: changes when the database is replaced (the broker re-reads).
    epoch: int
    #: The follower's position is below the feed's floor (events compacted away): no events;
    #: read the snapshot, then follow from its head (module doc).
    snapshot_required: bool = False


#: The ``reason`` of the events a follower applies from a snapshot.
SNAPSHOT_REASON: Final = "snapshot of the compacted feed"
#: Response header of a snapshot page that has more after it: its ``next_after``, so that a
#: follower asks for the next page before it has parsed this one.
SNAPSHOT_NEXT_HEADER: Final = "X-Certfleet-Next-After"


class RevocationSnapshot(BaseModel):
    """``GET /api/v1/revocations/snapshot``: what a follower that applied every event up to
    ``head_seq`` holds (its expired serials left out). Read after the head: it may already
    hold some events above it, which the follower reads again from the tail (harmless: the
    revoked set only grows)."""

    head_seq: int
    epoch: int
    #: The highest sequence number compacted away (0: none).
    floor: int
    read_at: Annotated[dt.datetime, AfterValidator(_aware)]
    #: Every revoked serial whose certificate has not expired (plus the clock-skew margin)
    #: -> its not_after.
    not_after: Annotated[dict[str, dt.datetime], AfterValidator(_aware_map)]
    #: Every decommissioned device.
    devices: list[str]
    #: Every revoked issuing CA's key id (lower-case hex).
    issuers: list[str]
    #: A page of a paged snapshot (``?after_serial=&limit=``) that has more serials after it:
    #: ask again with ``after_serial`` set to this. None: the last page (or not paged).
    #: Devices and issuing CAs come with the first page only.
    next_after: str | None = None

    def as_events(
        self, chunk: int = FEED_BATCH_DEFAULT, seq: int | None = None
    ) -> list[RevocationEvent]:
        """The snapshot as events a follower applies the usual way, all at ``seq``
        (default ``head_seq``; a page before the last carries the follower's position
        instead, so that nothing reports the head applied before it is):
        ``superseded`` events of ``chunk`` serials (they revoke serials, drop those
        sessions), one ``decommission`` (no serials) per device, one ``issuer_revoked`` per
        issuing CA."""
        serials = sorted(self.not_after)
        at = self.head_seq if seq is None else seq

        def event(kind: EventKind, device_id: str, batch: list[str]) -> RevocationEvent:
            return RevocationEvent(
                seq=at,
                device_id=device_id,
                serials=batch,
                reason=SNAPSHOT_REASON,
                revoked_at=self.read_at,
                kind=kind,
                not_after={s: self.not_after[s] for s in batch},
                issuer=device_id if kind == "issuer_revoked" else None,
            )

        events = [
            event("superseded", "snapshot", serials[start : start + chunk])
            for start in range(0, len(serials), chunk)
        ]
        events += [event("decommission", device_id, []) for device_id in self.devices]
        events += [event("issuer_revoked", key_id, []) for key_id in self.issuers]
        return events
