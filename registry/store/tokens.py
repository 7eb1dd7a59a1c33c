"""Operators' bearer tokens: stored as SHA-256 hashes, shown in clear once at creation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlmodel import Session, col, select

from fleetcore.clock import utcnow
from fleetcore.profile import DEFAULT_OPERATOR_ROLE, OperatorRole
from registry.db import write_transaction
from registry.errors import InvalidRequestError, NotFoundError
from registry.models import ApiToken, TokenInfo
from registry.store.audit import Actor, add_entry

__all__ = [
    "TOKEN_PREFIX",
    "TokenMatch",
    "TokenRevocation",
    "create_token",
    "find_token",
    "list_tokens",
    "operator_for_token",
    "revoke_tokens",
    "token_hash",
    "token_role",
]

TOKEN_PREFIX = "cfr_"  # noqa: S105  (a marker prefix, not a secret)


def token_hash(token: str) -> str:
    """The stored form of a bearer token (hex SHA-256)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    session: Session,
    operator: str,
    actor: Actor,
    role: OperatorRole = DEFAULT_OPERATOR_ROLE,
) -> str:
    """Create a bearer token for ``operator`` acting with ``role``; returns it (the only time
    it exists in clear)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with write_transaction(session):
        session.add(
            ApiToken(
                operator=operator,
                token_sha256=token_hash(token),
                created_at=utcnow(),
                role=role.value,
            )
        )
        add_entry(session, actor, "token_create", f"operator/{operator}", {"token_role": role})
    return token


def token_role(stored: str | None) -> OperatorRole:
    """A stored token's role; NULL (made before roles existed) acts as the default."""
    return OperatorRole(stored) if stored else DEFAULT_OPERATOR_ROLE


@dataclass(frozen=True, slots=True)
class TokenMatch:
    """The stored token a bearer token hashes to (revoked or not)."""

    id: int
    operator: str
    revoked: bool
    role: OperatorRole


def find_token(session: Session, token: str) -> TokenMatch | None:
    """The stored token ``token`` hashes to, revoked ones included; None when unknown."""
    digest = token_hash(token)
    row = session.exec(select(ApiToken).where(ApiToken.token_sha256 == digest)).first()
    if row is None or row.id is None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    return TokenMatch(row.id, row.operator, row.revoked, token_role(row.role))


def operator_for_token(session: Session, token: str) -> str | None:
    """The operator a bearer token belongs to, or None (unknown or revoked)."""
    match = find_token(session, token)
    return None if match is None or match.revoked else match.operator


def _token_info(row: ApiToken) -> TokenInfo:
    assert row.id is not None
    return TokenInfo(
        id=row.id,
        operator=row.operator,
        role=token_role(row.role).value,
        created_at=row.created_at,
        revoked=row.revoked,
        revoked_at=row.revoked_at,
    )


def list_tokens(session: Session, operator: str | None = None) -> list[TokenInfo]:
    """Every bearer token (of ``operator``, when given), oldest first; no hashes."""
    query = select(ApiToken).order_by(col(ApiToken.id))
    if operator is not None:
        query = query.where(ApiToken.operator == operator)
    return [_token_info(row) for row in session.exec(query).all()]


@dataclass(frozen=True, slots=True)
class TokenRevocation:
    """What :func:`revoke_tokens` did: tokens revoked now, and those revoked before."""

    revoked: list[TokenInfo]
    already_revoked: list[TokenInfo]


def revoke_tokens(
    session: Session,
    actor: Actor,
    *,
    token_id: int | None = None,
    operator: str | None = None,
) -> TokenRevocation:
    """Revoke one token (``token_id``) or all of ``operator``'s, in one write transaction
    with one audit entry per token revoked. Tokens already revoked are left as they were
    (no audit entry). Raises NotFoundError when nothing matches."""
    if (token_id is None) == (operator is None):
        raise InvalidRequestError("give exactly one of a token id or an operator name")
    query = select(ApiToken).order_by(col(ApiToken.id))
    if token_id is not None:
        query = query.where(ApiToken.id == token_id)
        missing = f"no token with id {token_id}: see 'certfleet registry token list'"
    else:
        query = query.where(ApiToken.operator == operator)
        missing = f"operator {operator!r} has no tokens: see 'certfleet registry token list'"
    revoked: list[TokenInfo] = []
    already: list[TokenInfo] = []
    with write_transaction(session):
        rows = list(session.exec(query).all())
        if not rows:
            raise NotFoundError(missing)
        now = utcnow()
        for row in rows:
            if row.revoked:
                already.append(_token_info(row))
                continue
            row.revoked = True
            row.revoked_at = now
            session.add(row)
            add_entry(
                session,
                actor,
                "token_revoke",
                f"token/{row.id}",
                {
                    "operator": row.operator,
                    "selected_by": "id" if token_id is not None else "operator",
                },
            )
            revoked.append(_token_info(row))
    return TokenRevocation(revoked, already)
