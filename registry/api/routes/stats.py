"""Fleet statistics: devices by status, upcoming expiries per week, seen in the last minute."""

from __future__ import annotations

from fastapi import APIRouter

from fleetcore.clock import utcnow
from registry.api.deps import CurrentViewer, SessionDep
from registry.api.routes import API_PREFIX
from registry.models import Stats
from registry.store.stats import stats as fleet_stats

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["stats"])


@router.get("/stats", response_model=Stats)
def stats(caller: CurrentViewer, session: SessionDep) -> Stats:
    return fleet_stats(session, utcnow())
