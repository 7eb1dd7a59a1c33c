"""Console sign-ins: sessions and the failed-sign-in rate limit, both kept in the database.

The cookie holds a random session id; the database holds only its SHA-256, the operator, how
they signed in, the CSRF token of the session and its expiry. Kept in the database (not in a
process), a session outlives a restart and is valid on every registry process of one
database, and failed sign-ins are counted across all of them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from fleetcore.profile import DEFAULT_OPERATOR_ROLE, OperatorRole
from registry.auth import Caller
from registry.db import write_transaction
from registry.models import ApiToken, ConsoleSession, ConsoleSigninFailure
from registry.store import audit
from registry.store.tokens import token_role

__all__ = [
    "SESSION_COOKIE",
    "SIGNIN_COOKIE",
    "ConsoleUser",
    "RateLimited",
    "check_rate_limit",
    "create_session",
    "end_session",
    "find_session",
    "record_failure",
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

    def actor(self, from_addr: str | None) -> audit.Actor:
        """The audit log's actor, naming the role acted with."""
        return audit.Actor(who=self.who, from_addr=from_addr, role=self.role.value)


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
    db: Session, caller: Caller, lifetime: dt.timedelta, now: dt.datetime, from_addr: str | None
) -> tuple[str, ConsoleUser]:
    """Store a new session for ``caller`` (an operator), with its audit entry; returns the
    cookie value and the user. Sessions past their expiry are deleted in the same transaction.
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
        from_addr=from_addr,
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
            user.actor(from_addr),
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


def check_rate_limit(
    db: Session, client: str, now: dt.datetime, window: dt.timedelta, max_failures: int
) -> None:
    """Raise RateLimited when ``client`` failed ``max_failures`` times within ``window``."""
    count, oldest = db.exec(
        select(func.count(), func.min(ConsoleSigninFailure.at)).where(
            ConsoleSigninFailure.client == client, col(ConsoleSigninFailure.at) > now - window
        )
    ).one()
    if count >= max_failures and oldest is not None:
        oldest_at = oldest if isinstance(oldest, dt.datetime) else dt.datetime.fromisoformat(oldest)
        if oldest_at.tzinfo is None:
            oldest_at = oldest_at.replace(tzinfo=dt.UTC)
        retry = max(1, int((oldest_at + window - now).total_seconds()) + 1)
        raise RateLimited(client, retry)


def record_failure(db: Session, client: str, now: dt.datetime, window: dt.timedelta) -> None:
    """Count one failed sign-in of ``client``; forget failures older than the window."""
    with write_transaction(db):
        db.execute(delete(ConsoleSigninFailure).where(col(ConsoleSigninFailure.at) <= now - window))
        db.add(ConsoleSigninFailure(client=client[:64], at=now))
