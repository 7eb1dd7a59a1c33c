"""The revocation feed's wire format, shared by the registry (which serves it) and the broker
(which follows it): ``GET /api/v1/revocations?after=&wait=&limit=``.

Pure pydantic, so the broker reads the feed without importing the registry's database code.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel

from fleetcore.reasons import DEFAULT_REASON_CODE, ReasonCode

__all__ = ["FEED_BATCH_DEFAULT", "FEED_BATCH_MAX", "RevocationEvent", "RevocationFeed"]

#: Events per answer when the follower does not say (``limit``), and the most it may ask for.
FEED_BATCH_DEFAULT: Final = 1000
FEED_BATCH_MAX: Final = 5000


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; every time the feed carries is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _lower(serials: list[str]) -> list[str]:
    return [s.lower() for s in serials]


class RevocationEvent(BaseModel):
    """One decommission: the device and every serial it held (lower-case hex)."""

    seq: int
    device_id: str
    serials: Annotated[list[str], AfterValidator(_lower)]
    reason: str
    reason_code: ReasonCode = DEFAULT_REASON_CODE
    revoked_at: Annotated[dt.datetime, AfterValidator(_aware)]


class RevocationFeed(BaseModel):
    """One answer of the feed: events after the cursor, the cursor to ask from next."""

    events: list[RevocationEvent]
    last_seq: int
    head_seq: int
    #: Random per database: changes when the database is replaced (the broker re-reads).
    epoch: int
