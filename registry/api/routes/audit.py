"""A device's audit trail (operators only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from registry.api.deps import CurrentViewer, SessionDep
from registry.api.routes import API_PREFIX
from registry.models import DEVICE_ID_PATTERN
from registry.store.audit import AuditPage, device_audit

__all__ = ["router"]

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])

_ERROR = {"description": "refused, with {'detail': {'error': code, 'message': text}}"}
_REFUSALS: dict[int | str, dict[str, Any]] = {401: _ERROR, 403: _ERROR, 404: _ERROR, 422: _ERROR}


@router.get("/{device_id}/audit", response_model=AuditPage, responses=_REFUSALS)
def get_device_audit(
    device_id: Annotated[str, Path(pattern=DEVICE_ID_PATTERN, max_length=64)],
    caller: CurrentViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> AuditPage:
    """The device's audit entries, newest first; pass ``next_cursor`` back for older ones."""
    return device_audit(session, device_id, limit=limit, cursor=cursor)
