"""Liveness and readiness (public)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from sqlmodel import Session

from registry.api.deps import StateDep
from registry.api.routes import API_PREFIX
from registry.state import RegistryState
from registry.store import revocations

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["health"])


def _head(state: RegistryState) -> int:
    with Session(state.engine) as session:
        return revocations.head_seq(session)


@router.get("/healthz")
async def healthz(state: StateDep) -> dict[str, str | int]:
    """``ok`` when the database answers; includes the revocation feed's head."""
    head = await asyncio.get_running_loop().run_in_executor(state.probe_threads, _head, state)
    return {"status": "ok", "head_seq": head}
