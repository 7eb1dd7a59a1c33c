"""The database's named counters (the ``counter`` table): feed sequence, CRL number, epoch.

A counter is incremented under a row lock inside the caller's write transaction, so its
values only grow, across restarts and across registry processes sharing the database.
"""

from __future__ import annotations

from sqlmodel import Session, select

from registry.models import Counter

__all__ = ["CRL_NUMBER", "FEED_EPOCH", "REVOCATION_SEQ", "bump", "read"]

REVOCATION_SEQ = "revocation_seq"
CRL_NUMBER = "crl_number"
#: A random number drawn once per database (no migration): a broker that sees it change
#: knows the feed's sequence numbers start over, and re-reads from 0.
FEED_EPOCH = "feed_epoch"


def bump(session: Session, name: str) -> int:
    """Increment counter ``name`` under a row lock and return its new value."""
    counter = session.exec(select(Counter).where(Counter.name == name).with_for_update()).one()
    counter.value += 1
    session.add(counter)
    return counter.value


def read(session: Session, name: str) -> int | None:
    """Counter ``name``'s value, None when the row does not exist."""
    value = session.exec(select(Counter.value).where(Counter.name == name)).first()
    return None if value is None else int(value)
