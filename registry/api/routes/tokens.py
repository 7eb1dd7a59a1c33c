"""Operators' bearer tokens over the API (admin role only): list, create with a role, revoke.

The same service functions as ``certfleet registry token ...`` (:mod:`registry.operations`),
which an administrator with the data folder runs locally.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field
from sqlmodel import Session

from fleetcore.profile import DEFAULT_OPERATOR_ROLE, NAME_PATTERN, OperatorRole
from registry import operations
from registry.api.deps import CurrentAdmin, StateDep
from registry.api.routes import API_PREFIX
from registry.models import TokenInfo
from registry.store.tokens import list_tokens

__all__ = ["router"]

router = APIRouter(prefix=f"{API_PREFIX}/tokens", tags=["tokens"])

_ERROR = {"description": "refused, with {'detail': {'error': code, 'message': text}}"}
_REFUSALS: dict[int | str, dict[str, Any]] = {401: _ERROR, 403: _ERROR, 422: _ERROR}


class TokenCreate(BaseModel):
    operator: str = Field(pattern=NAME_PATTERN.pattern, max_length=64)
    role: OperatorRole = DEFAULT_OPERATOR_ROLE


class TokenCreated(BaseModel):
    operator: str
    role: OperatorRole
    #: the bearer token, shown this once (only its hash is stored).
    token: str


class TokensRevoked(BaseModel):
    revoked: list[int]
    already_revoked: list[int]


@router.get("", response_model=list[TokenInfo], responses=_REFUSALS)
def get_tokens(caller: CurrentAdmin, state: StateDep) -> list[TokenInfo]:
    """Every bearer token: id, operator, role, created, revoked (never a token or hash)."""
    with Session(state.engine) as session:
        return list_tokens(session)


@router.post("", response_model=TokenCreated, status_code=201, responses=_REFUSALS)
def create_token(
    body: TokenCreate, caller: CurrentAdmin, state: StateDep, request: Request
) -> TokenCreated:
    """Create a bearer token for an operator with a role; the answer holds it once."""
    token = operations.create_token(state.engine, body.operator, caller.actor(request), body.role)
    return TokenCreated(operator=body.operator, role=body.role, token=token)


@router.post(
    "/{token_id}/revoke", response_model=TokensRevoked, responses={404: _ERROR, **_REFUSALS}
)
def revoke_token(
    token_id: Annotated[int, Path(ge=1)], caller: CurrentAdmin, state: StateDep, request: Request
) -> TokensRevoked:
    """Revoke one token; effective on its next request (console sessions end with it)."""
    outcome = operations.revoke_tokens(state.engine, caller.actor(request), token_id=token_id)
    return TokensRevoked(
        revoked=[token.id for token in outcome.revoked],
        already_revoked=[token.id for token in outcome.already_revoked],
    )
