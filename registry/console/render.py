"""Templates (Jinja2, autoescaped) and the security headers of every console response."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from fleetcore.clock import utcnow

__all__ = ["CONSOLE_PREFIX", "STATIC_DIR", "ConsoleHeadersMiddleware", "render"]

CONSOLE_PREFIX = "/ui"
TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")

#: Scripts and styles only from our own files; no inline script, no framing, forms to us only.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Swagger UI sets inline styles on its elements.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "never"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    if value is None:
        return "never"
    seconds = int(((now or utcnow()) - value).total_seconds())
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _environment() -> Environment:
    # autoescape=True for every template: device ids, telemetry and reasons are shown as text.
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["when"] = _when
    environment.filters["ago"] = _ago
    environment.filters["json"] = _json
    environment.filters["compact"] = lambda v: json.dumps(v, sort_keys=True, default=str)
    environment.filters["thousands"] = lambda n: f"{n:,}"
    return environment


_ENVIRONMENT = _environment()


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render ``template`` with ``context`` (plus ``prefix``) into an HTML response."""
    html = _ENVIRONMENT.get_template(template).render(prefix=CONSOLE_PREFIX, **context)
    return HTMLResponse(html, status_code=status_code)


Message = MutableMapping[str, Any]
ASGIApp = Callable[..., Awaitable[None]]


class ConsoleHeadersMiddleware:
    """Security headers on ``/ui`` and ``/docs`` responses, and ``Server-Timing``: the
    server's time to the response start (what bench/bench_console.py reads)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/"):
            csp = CONSOLE_CSP
        elif path == "/docs" or path.startswith("/docs/"):
            csp = DOCS_CSP
        else:
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", csp.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),  # no-referrer makes Origin "null"
                    (b"server-timing", f"app;dur={elapsed_ms:.2f}".encode()),
                ]
                if not path.startswith((CONSOLE_PREFIX + "/static/", "/docs/assets/")):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_with_headers)
