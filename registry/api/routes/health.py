"""Liveness and readiness (public)."""

from __future__ import annotations

from fastapi import APIRouter

from registry import crud
from registry.api.deps import SessionDep
from registry.api.routes import API_PREFIX

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str | int]:
    """``ok`` when the database answers; includes the revocation feed's head."""
    return {"status": "ok", "head_seq": crud.head_seq(session)}
