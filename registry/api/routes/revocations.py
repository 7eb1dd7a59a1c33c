"""The revocation feed: ordered, gap-free, long-polling when nothing is newer."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from fleetcore.revocation_feed import (
    FEED_BATCH_DEFAULT,
    FEED_BATCH_MAX,
    KINDS_PATTERN,
    SNAPSHOT_NEXT_HEADER,
    RevocationFeed,
    RevocationSnapshot,
    parse_kinds,
)
from registry.api.deps import CurrentReader, StateDep
from registry.api.routes import API_PREFIX
from registry.feed import FeedAnswer
from registry.state import RegistryState
from registry.store.revocations import revocation_snapshot, revocations_after

#: The largest page of the snapshot a follower may ask for.
SNAPSHOT_PAGE_MAX = 100_000

__all__ = ["router"]

#: Sequence numbers are 32-bit signed integers in the database.
MAX_SEQ = 2**31 - 1

router = APIRouter(prefix=API_PREFIX, tags=["revocations"])


def _read(state: RegistryState, after: int, limit: int, kinds: tuple[str, ...]) -> FeedAnswer:
    with Session(state.engine) as session:
        return FeedAnswer.of(revocations_after(session, after, limit, kinds))


def _diverged(feed: RevocationFeed, after: int, epoch: int | None) -> bool:
    """The follower's position was not reached in this feed."""
    return after > feed.head_seq or (epoch is not None and epoch != feed.epoch)


@router.get("/revocations", response_model=RevocationFeed)
async def revocations(
    caller: CurrentReader,
    state: StateDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
    limit: Annotated[int, Query(ge=1, le=FEED_BATCH_MAX)] = FEED_BATCH_DEFAULT,
    kinds: Annotated[
        str | None,
        Query(
            max_length=100,
            pattern=KINDS_PATTERN,
            description="comma-separated event kinds (decommission, superseded); "
            "absent: decommission only, for followers older than event kinds",
        ),
    ] = None,
    epoch: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_SEQ,
            description="the feed epoch the follower's position was reached in; when it is "
            "not this feed's epoch the answer comes at once (the follower must resync)",
        ),
    ] = None,
) -> Response:
    """Events with ``seq > after``; when there are none, wait up to ``wait`` seconds.

    A follower whose position is not in this feed (``after`` above the head: a database
    restored from an older copy; or ``epoch`` not this feed's: a new database) is answered
    at once, without waiting: its resync must start now, not when the long-poll ends. So is
    a follower below the feed's floor (events compacted away): ``snapshot_required``.

    The long-polls one publication wakes share one read and one encoded body
    (:class:`registry.feed.SharedReads`): waking a hundred followers costs one query.
    """
    wanted = parse_kinds(kinds)  # the pattern admitted only known kinds
    deadline = time.monotonic() + min(wait, state.settings.registry_feed_max_wait)
    poll = state.settings.registry_feed_poll_seconds
    while True:
        generation = state.feed.generation
        answer = await state.feed_reads.get(
            generation, (after, limit, wanted), lambda: _read(state, after, limit, wanted)
        )
        feed = answer.feed
        remaining = deadline - time.monotonic()
        if (
            feed.events
            or remaining <= 0
            or state.feed.closed
            or feed.snapshot_required
            or _diverged(feed, after, epoch)
        ):
            return Response(answer.body, media_type="application/json")
        state.metrics.feed_waiters.inc()
        try:
            await state.feed.wait(generation, min(remaining, poll))
        finally:
            state.metrics.feed_waiters.dec()


def _snapshot(
    state: RegistryState, after_serial: str, limit: int | None
) -> tuple[bytes, str | None]:
    with Session(state.engine) as session:
        snapshot = revocation_snapshot(session, after_serial=after_serial, limit=limit)
        return snapshot.model_dump_json().encode(), snapshot.next_after


@router.get("/revocations/snapshot", response_model=RevocationSnapshot)
async def snapshot(
    caller: CurrentReader,
    state: StateDep,
    after_serial: Annotated[str, Query(pattern=r"^[0-9a-f]{0,48}$")] = "",
    limit: Annotated[int | None, Query(ge=1, le=SNAPSHOT_PAGE_MAX)] = None,
) -> Response:
    """The live revoked state and the feed head it covers, for a follower whose position is
    below the feed's floor (answered ``snapshot_required``) or far behind the head: it adds
    all of it, then follows the feed from ``head_seq``. With ``limit``, one page: the
    serials above ``after_serial`` (lower-case hex), and ``next_after`` naming where the
    next page starts (devices and issuing CAs on the first page). Read and encoded in a
    worker thread (it grows with the revoked set: about 70 bytes a live revoked serial).
    ``next_after`` is also the :data:`SNAPSHOT_NEXT_HEADER` header: a follower asks for the
    next page while it parses this one."""
    body, next_after = await run_in_threadpool(_snapshot, state, after_serial, limit)
    headers = {} if next_after is None else {SNAPSHOT_NEXT_HEADER: next_after}
    return Response(body, media_type="application/json", headers=headers)
