"""Claims of zero-touch enrollment: recorded by the factory, listed and revoked by operators."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from registry.api.deps import CurrentOperator, CurrentRegistrar, SessionDep
from registry.api.routes import API_PREFIX
from registry.est.models import ClaimPublic, ClaimRegistration, ClaimRevokeRequest
from registry.models import DEVICE_ID_PATTERN
from registry.store import claims

__all__ = ["router"]

router = APIRouter(prefix=f"{API_PREFIX}/claims", tags=["claims"])

Batch = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, max_length=64)]
_ERROR = {"description": "refused, with {'detail': {'error': code, 'message': text}}"}
_REFUSALS: dict[int | str, dict[str, Any]] = {401: _ERROR, 403: _ERROR}


@router.post(
    "",
    response_model=ClaimPublic,
    status_code=201,
    responses={200: {"description": "recorded already"}, 409: _ERROR, **_REFUSALS},
)
def record_claim(
    body: ClaimRegistration,
    caller: CurrentRegistrar,
    session: SessionDep,
    request: Request,
    response: Response,
) -> ClaimPublic:
    """Record a batch's claim (its certificate's serial, quota, expiry, allow-list)."""
    if not claims.record_claim(session, body, caller.actor(request)):
        response.status_code = 200
    return claims.get_claim(session, body.batch)


@router.get("", response_model=list[ClaimPublic], responses=_REFUSALS)
def list_claims(caller: CurrentOperator, session: SessionDep) -> list[ClaimPublic]:
    """Every claim with its quota and how many devices enrolled with it."""
    return claims.list_claims(session)


@router.get("/{batch}", response_model=ClaimPublic, responses={404: _ERROR, **_REFUSALS})
def get_claim(batch: Batch, caller: CurrentOperator, session: SessionDep) -> ClaimPublic:
    """One claim."""
    return claims.get_claim(session, batch)


@router.post("/{batch}/revoke", response_model=ClaimPublic, responses={404: _ERROR, **_REFUSALS})
def revoke_claim(
    batch: Batch,
    body: ClaimRevokeRequest,
    caller: CurrentOperator,
    session: SessionDep,
    request: Request,
) -> ClaimPublic:
    """Revoke a claim: nobody enrolls with it any more (enrolled devices stay)."""
    return claims.revoke_claim(session, batch, body.reason, caller.actor(request))
