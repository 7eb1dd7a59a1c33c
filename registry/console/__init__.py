"""The operator web console at ``/ui`` (server-rendered, every asset ours) and ``/docs``."""

from __future__ import annotations

import json
from typing import Any, cast
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles

from registry.console.docs import install_docs
from registry.console.render import CONSOLE_PREFIX, STATIC_DIR, ConsoleHeadersMiddleware, render
from registry.console.routes import router as pages
from registry.console.signin import router as signin
from registry.errors import ConsoleRefusal, SignInRequired

__all__ = ["install_console"]


def install_console(app: FastAPI) -> None:
    """Add the console's routes, static files, error pages, headers and ``/docs``.

    Call it before the app's own ``docs_url`` would be set: create the app with
    ``docs_url=None``.
    """
    app.include_router(signin)
    app.include_router(pages)
    app.mount(f"{CONSOLE_PREFIX}/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    install_docs(app)

    @app.get(CONSOLE_PREFIX, include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse(f"{CONSOLE_PREFIX}/", status_code=307)

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, exc: SignInRequired) -> Response:
        if request.url.path == f"{CONSOLE_PREFIX}/fleet/live":
            return PlainTextResponse("signed out", status_code=401)
        if request.method != "GET":
            return render(
                request,
                "error.html",
                status_code=401,
                title="Signed out",
                user=None,
                message="Your console session has ended. Sign in again, then repeat the action.",
            )
        return RedirectResponse(
            f"{CONSOLE_PREFIX}/sign-in?next={quote(exc.next_url, safe='/')}", status_code=303
        )

    @app.exception_handler(ConsoleRefusal)
    async def console_refusal(request: Request, exc: ConsoleRefusal) -> HTMLResponse:
        return render(
            request,
            "error.html",
            status_code=exc.status,
            title="Refused" if exc.status in (401, 403) else "Not found",
            user=None,
            message=exc.message,
        )

    _errors_as_pages(app)
    app.add_middleware(ConsoleHeadersMiddleware)


def _errors_as_pages(app: FastAPI) -> None:
    """The app's JSON error answers (RegistryError, database unavailable or busy, ...) become
    an error page with the same status and message on console paths; elsewhere unchanged."""
    for exc_class, handler in list(app.exception_handlers.items()):
        if not isinstance(exc_class, type) or exc_class in (SignInRequired, ConsoleRefusal):
            continue
        app.add_exception_handler(exc_class, _as_page(handler))


def _as_page(handler: Any) -> Any:
    async def handle(request: Request, exc: Exception) -> Response:
        answer = await handler(request, exc)
        path = request.url.path
        if not path.startswith(CONSOLE_PREFIX + "/") or not isinstance(answer, JSONResponse):
            return cast(Response, answer)
        detail = json.loads(bytes(answer.body)).get("detail")
        message = detail.get("message") if isinstance(detail, dict) else None
        page = render(
            request,
            "error.html",
            status_code=answer.status_code,
            title="Refused" if answer.status_code < 500 else "Unavailable",
            user=None,
            message=message or "The registry could not answer; try again.",
        )
        if "retry-after" in answer.headers:
            page.headers["Retry-After"] = answer.headers["retry-after"]
        return page

    return handle
