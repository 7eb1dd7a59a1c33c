"""Console sign-ins: sessions and the failed-sign-in rate limit, both kept in the database.

The cookie holds a random session id; the database holds only its SHA-256, the operator, how
they signed in, the CSRF token of the session and its expiry. Kept in the database (not in a
process), a session outlives a restart and is valid on every registry process of one
database, and failed sign-ins are counted across all of them. A sign-in attempt is taken
(counted) before its token is checked, atomically (:func:`take_attempt`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import delete, func, text
from sqlmodel import Session, col, select

from fleetcore.profile import DEFAULT_OPERATOR_ROLE, OperatorRole
from registry.auth import Caller, request_actor
from registry.db import write_transaction
from registry.models import ApiToken, ConsoleSession, ConsoleSigninFailure
from registry.store import audit
from registry.store.tokens import token_role

__all__ = [
    "SESSION_COOKIE",
    "SIGNIN_COOKIE",
    "ConsoleUser",
    "RateLimited",
    "create_session",
    "end_session",
    "find_session",
    "forget_attempt",
    "take_attempt",
    "same_secret",
]

#: ``__Host-``: the browser keeps it only if Secure, for this host, Path=/ (no Domain).
SESSION_COOKIE = "__Host-certfleet_console"
#: The sign-in form's CSRF cookie (double submit), set before anyone is signed in.
SIGNIN_COOKIE = "__Host-certfleet_signin"


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """The operator of one console session."""

    operator: str
    via: str
    csrf_token: str
    expires_at: dt.datetime
    role: OperatorRole = DEFAULT_OPERATOR_ROLE

    @property
    def who(self) -> str:
        """The audit log's actor for what this operator does through the console."""
        return f"console:operator/{self.operator}"

    @property
    def may_act(self) -> bool:
        """Whether the role allows acting on devices (decommission, re-enroll)."""
        return self.role.allows(OperatorRole.OPERATOR)

    def actor(self, request: Request) -> audit.Actor:
        """The audit log's actor for ``request``: peer, forwarded address, the role acted with."""
        return request_actor(self.who, request, role=self.role.value)


class RateLimited(Exception):
    """Too many failed sign-ins from one client address in the window."""

    def __init__(self, client: str, retry_after_s: int) -> None:
        minutes, seconds = divmod(retry_after_s, 60)
        wait = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
        super().__init__(f"Too many failed sign-ins from {client}. Try again in {wait}.")
        self.retry_after_s = retry_after_s


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a submitted secret (CSRF token) with the expected one."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def create_session(
    db: Session, caller: Caller, lifetime: dt.timedelta, now: dt.datetime, origin: audit.Actor
) -> tuple[str, ConsoleUser]:
    """Store a new session for ``caller`` (an operator), with its audit entry; returns the
    cookie value and the user (``origin``: where the sign-in came from, its ``who`` unused).
    Sessions past their expiry are deleted in the same transaction.
    """
    cookie = secrets.token_urlsafe(32)
    row = ConsoleSession(
        id_sha256=_digest(cookie),
        operator=caller.name,
        via=caller.via,
        token_id=caller.token_id,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + lifetime,
        from_addr=origin.from_addr,
        role=caller.role.value if caller.role is not None else None,
    )
    user = ConsoleUser(
        row.operator, row.via, row.csrf_token, row.expires_at, caller.role or DEFAULT_OPERATOR_ROLE
    )
    with write_transaction(db):
        db.execute(delete(ConsoleSession).where(col(ConsoleSession.expires_at) <= now))
        db.add(row)
        audit.add_entry(
            db,
            audit.Actor(user.who, origin.from_addr, origin.forwarded_for, role=user.role.value),
            "console_sign_in",
            f"operator/{caller.name}",
            {"via": caller.via},
        )
    return cookie, user


def find_session(db: Session, cookie: str, now: dt.datetime) -> ConsoleUser | None:
    """The live session of a cookie value; None when unknown, expired, or its token revoked.
    A token session acts with its token's role now (narrowing a token narrows its sessions)."""
    found = db.exec(
        select(ConsoleSession, ApiToken.revoked, ApiToken.role)
        .join(ApiToken, col(ApiToken.id) == col(ConsoleSession.token_id), isouter=True)
        .where(ConsoleSession.id_sha256 == _digest(cookie))
    ).first()
    if found is None:
        return None
    row, token_revoked, role_of_token = found
    if row.expires_at <= now or (row.token_id is not None and token_revoked is not False):
        return None
    role = token_role(role_of_token) if row.token_id is not None else token_role(row.role)
    return ConsoleUser(row.operator, row.via, row.csrf_token, row.expires_at, role)


def end_session(db: Session, cookie: str) -> None:
    with write_transaction(db):
        db.execute(delete(ConsoleSession).where(col(ConsoleSession.id_sha256) == _digest(cookie)))


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
    window. Raises RateLimited when the window is full. Failures older than the window are
    deleted on the way.
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
            raise RateLimited(client, retry)
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
