"""Prometheus metrics (operators and services)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from registry.api.deps import CurrentReader, StateDep
from registry.api.routes import API_PREFIX

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(caller: CurrentReader, state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
