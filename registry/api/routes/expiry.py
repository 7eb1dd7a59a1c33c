"""The fleet's expiry over the current certificates of active devices (operators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleetcore.clock import utcnow
from registry.api.deps import CurrentViewer, SessionDep
from registry.api.routes import API_PREFIX
from registry.models import ExpiryReport
from registry.store.expiry import LIST_LIMIT, expiry_report

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["stats"])


@router.get("/expiry", response_model=ExpiryReport)
def expiry(
    caller: CurrentViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=0, le=1000)] = LIST_LIMIT,
) -> ExpiryReport:
    """Buckets (expired, <7d, <30d, <90d, later), a histogram of not_after, and the expired
    and soonest-expiring devices (``limit`` of each)."""
    return expiry_report(session, utcnow(), limit)
