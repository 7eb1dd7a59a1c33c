"""Console sign-ins: sessions and the failed-sign-in rate limit, both kept in the database.

The cookie holds a random session id; the database holds only its SHA-256, the operator, how
they signed in, the CSRF token of the session and its expiry. Kept in the database (not in a
process), a session outlives a restart and is valid on every registry process of one
database, and failed sign-ins are counted across all of them. A sign-in attempt is taken
(counted) before its token is checked, atomically (:func:`take_attempt`). The queries are
:mod:`registry.store.console_sessions`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlmodel import Session

from fleetcore.profile import DEFAULT_OPERATOR_ROLE, OperatorRole
from registry.auth import Caller, request_actor
from registry.models import ConsoleSession
from registry.store import audit
from registry.store.console_sessions import (
    add_session,
    delete_session,
    forget_attempt,
    session_with_token,
    take_attempt,
)
from registry.store.tokens import token_role

__all__ = [
    "SESSION_COOKIE",
    "SIGNIN_COOKIE",
    "ConsoleUser",
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
    actor = audit.Actor(user.who, origin.from_addr, origin.forwarded_for, role=user.role.value)
    add_session(db, row, actor, now)
    return cookie, user


def find_session(db: Session, cookie: str, now: dt.datetime) -> ConsoleUser | None:
    """The live session of a cookie value; None when unknown, expired, or its token revoked.
    A token session acts with its token's role now (narrowing a token narrows its sessions)."""
    found = session_with_token(db, _digest(cookie))
    if found is None:
        return None
    row, token_revoked, role_of_token = found
    if row.expires_at <= now or (row.token_id is not None and token_revoked is not False):
        return None
    role = token_role(role_of_token) if row.token_id is not None else token_role(row.role)
    return ConsoleUser(row.operator, row.via, row.csrf_token, row.expires_at, role)


def end_session(db: Session, cookie: str) -> None:
    delete_session(db, _digest(cookie))
