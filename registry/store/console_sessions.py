"""Console sign-ins in the database: sessions (found by the SHA-256 of their cookie) and the
failed sign-ins per client address (:mod:`registry.console.sessions` is the console's side)."""

from __future__ import annotations

import datetime as dt
import hashlib

from sqlalchemy import delete, func, text
from sqlmodel import Session, col, select

from registry.db import write_transaction
from registry.errors import SigninRateLimitedError
from registry.models import ApiToken, ConsoleSession, ConsoleSigninFailure
from registry.store import audit

__all__ = [
    "add_session",
    "delete_session",
    "forget_attempt",
    "session_with_token",
    "take_attempt",
]


def add_session(db: Session, row: ConsoleSession, actor: audit.Actor, now: dt.datetime) -> None:
    """Store a new session with its audit entry (``actor`` signed in); sessions past their
    expiry are deleted in the same transaction."""
    with write_transaction(db):
        db.execute(delete(ConsoleSession).where(col(ConsoleSession.expires_at) <= now))
        db.add(row)
        audit.add_entry(db, actor, "console_sign_in", f"operator/{row.operator}", {"via": row.via})


def session_with_token(
    db: Session, id_sha256: str
) -> tuple[ConsoleSession, bool | None, str | None] | None:
    """The session of a cookie digest, with its token's revoked flag and role (None, None for
    a session opened by certificate); None when unknown."""
    found = db.exec(
        select(ConsoleSession, ApiToken.revoked, ApiToken.role)
        .join(ApiToken, col(ApiToken.id) == col(ConsoleSession.token_id), isouter=True)
        .where(ConsoleSession.id_sha256 == id_sha256)
    ).first()
    return None if found is None else (found[0], found[1], found[2])


def delete_session(db: Session, id_sha256: str) -> None:
    with write_transaction(db):
        db.execute(delete(ConsoleSession).where(col(ConsoleSession.id_sha256) == id_sha256))


def _lock_client(db: Session, client: str) -> None:
    """Serialize the sign-in attempts of one client address until the transaction ends.

    SQLite: the write transaction (BEGIN IMMEDIATE) already serializes every writer.
    PostgreSQL: a transaction-scoped advisory lock on a key derived from the address, so
    that counting and inserting are one step for that address across registry processes.
    """
    if db.get_bind().dialect.name == "postgresql":
        digest = hashlib.sha256(f"console-signin\n{client}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def take_attempt(
    db: Session, client: str, now: dt.datetime, window: dt.timedelta, max_failures: int
) -> int:
    """Take one sign-in attempt of ``client`` BEFORE its token is checked; returns its id.

    Counting the failures in the window and recording this attempt (as a failure until
    :func:`forget_attempt` says it succeeded) are one transaction under a per-address lock:
    however many requests arrive at once, at most ``max_failures`` tokens are checked per
    window. Raises SigninRateLimitedError when the window is full. Failures older than the
    window are deleted on the way.
    """
    client = client[:64]
    with write_transaction(db):
        _lock_client(db, client)
        db.execute(delete(ConsoleSigninFailure).where(col(ConsoleSigninFailure.at) <= now - window))
        count, oldest = db.exec(
            select(func.count(), func.min(ConsoleSigninFailure.at)).where(
                ConsoleSigninFailure.client == client, col(ConsoleSigninFailure.at) > now - window
            )
        ).one()
        if count >= max_failures and oldest is not None:
            oldest_at = (
                oldest if isinstance(oldest, dt.datetime) else dt.datetime.fromisoformat(oldest)
            )
            if oldest_at.tzinfo is None:
                oldest_at = oldest_at.replace(tzinfo=dt.UTC)
            retry = max(1, int((oldest_at + window - now).total_seconds()) + 1)
            raise SigninRateLimitedError(client, retry)
        attempt = ConsoleSigninFailure(client=client, at=now)
        db.add(attempt)
        db.flush()
        assert attempt.id is not None
        attempt_id = attempt.id
    return attempt_id


def forget_attempt(db: Session, attempt_id: int) -> None:
    """The attempt :func:`take_attempt` recorded succeeded: it no longer counts as a failure."""
    with write_transaction(db):
        db.execute(delete(ConsoleSigninFailure).where(col(ConsoleSigninFailure.id) == attempt_id))
