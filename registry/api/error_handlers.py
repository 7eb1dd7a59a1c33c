"""The registry's error answers, one shape for every listener (the HTTPS API and console, the
plain-HTTP publication listener): ``{"detail": {"error": <code>, "message": <why>}}`` with the
error's status, ``Retry-After`` on every 503."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import ClientDisconnect

from registry.errors import RegistryError

__all__ = ["RETRY_AFTER_S", "install_error_handlers"]

log = logging.getLogger(__name__)


#: Retry-After of every 503: the causes (pool, database, CRL signer) pass in about a second.
RETRY_AFTER_S = "1"


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse(
        {"detail": {"error": code, "message": message}}, status_code=status, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer the app's expected failures as JSON ``{"detail": {"error", "message"}}``: a
    refused request (RegistryError), a write conflict (409), the database unavailable or its
    pool exhausted (503 with Retry-After); a client that hung up gets one counted log line."""

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Expected (a relying party timed out, a scanner): one counted info line, no traceback.
        listener = "publication" if request.url.scheme == "http" else "https"
        request.app.state.registry.metrics.client_disconnects.labels(listener).inc()
        log.info(
            "client hung up mid-request listener=%s method=%s path=%s from=%s",
            listener,
            request.method,
            request.url.path,
            f"{request.client.host}:{request.client.port}" if request.client else "-",
        )
        return Response(status_code=400)  # nobody reads it; the connection is closed

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        log.info(
            "request refused status=%d error=%s method=%s path=%s message=%s",
            exc.status,
            exc.code,
            request.method,
            request.url.path,
            exc,
        )
        return _error(exc.status, exc.code, str(exc))

    @app.exception_handler(IntegrityError)
    async def integrity_error(request: Request, exc: IntegrityError) -> JSONResponse:
        log.warning("write conflict method=%s path=%s", request.method, request.url.path)
        return _error(
            409,
            "conflict",
            "a concurrent request registered the same device, serial or hardware serial; "
            "retry to see the outcome",
        )

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        log.error(
            "database unavailable method=%s path=%s error=%s",
            request.method,
            request.url.path,
            type(exc.orig).__name__,
        )
        return _error(503, "database_unavailable", "the registry database is unavailable; retry")

    @app.exception_handler(PoolTimeoutError)
    async def pool_exhausted(request: Request, exc: PoolTimeoutError) -> JSONResponse:
        # Not an OperationalError: the pool had no free connection within its short timeout.
        log.error("database pool exhausted method=%s path=%s", request.method, request.url.path)
        request.app.state.registry.metrics.pool_exhausted.inc()
        return _error(
            503, "database_busy", "the registry has no free database connection; retry shortly"
        )
