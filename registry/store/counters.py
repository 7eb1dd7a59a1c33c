"""The database's named counters (the ``counter`` table): feed sequence, CRL number, epoch.

A counter is incremented under a row lock inside the caller's write transaction, so its
values only grow, across restarts and across registry processes sharing the database.
"""

from __future__ import annotations

from sqlmodel import Session, col, select, update

from registry.models import Counter

__all__ = ["CRL_NUMBER", "FEED_EPOCH", "FEED_FLOOR", "REVOCATION_SEQ", "bump", "read"]

REVOCATION_SEQ = "revocation_seq"
CRL_NUMBER = "crl_number"
#: A random number drawn once per database (no migration): a broker that sees it change
#: knows the feed's sequence numbers start over, and re-reads from 0.
FEED_EPOCH = "feed_epoch"
#: The highest feed sequence number compacted away (no row: nothing was); followers below it
#: catch up from a snapshot (:func:`registry.store.revocations.compact_feed`).
FEED_FLOOR = "feed_floor"


def bump(session: Session, name: str) -> int:
    """Increment counter ``name`` under a row lock and return its new value.

    One statement (``UPDATE ... RETURNING``): the row lock it takes is held until the caller
    commits and serializes every writer of the counter (a burst of decommissions), so the
    fewer round trips after it, the shorter each waits."""
    statement = (
        update(Counter)
        .where(col(Counter.name) == name)
        .values(value=col(Counter.value) + 1)
        .returning(col(Counter.value))
    )
    return int(session.execute(statement).scalar_one())


def read(session: Session, name: str) -> int | None:
    """Counter ``name``'s value, None when the row does not exist."""
    value = session.exec(select(Counter.value).where(Counter.name == name)).first()
    return None if value is None else int(value)
