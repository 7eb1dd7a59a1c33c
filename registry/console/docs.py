"""``/docs``: Swagger UI from local assets (the ``swagger-ui-py`` package's copy, no CDN),
and the OpenAPI document's security schemes: bearer token and mutual TLS.

Every operation that authenticates its caller declares ``bearerAuth`` (through
``registry.api.deps.bearer_scheme``); :func:`install_docs` adds ``mutualTLS`` as the
alternative, so "Authorize" takes a token and a browser's client certificate also counts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from fleetcore.errors import ConfigError
from registry.console.render import CONSOLE_PREFIX, render

__all__ = ["DOCS_ASSETS", "install_docs", "swagger_ui_dir"]

DOCS_ASSETS = "/docs/assets"
MUTUAL_TLS = "mutualTLS"
BEARER = "bearerAuth"


def swagger_ui_dir() -> Path:
    """Swagger UI's dist files as shipped by the ``swagger-ui-py`` package (not imported)."""
    spec = importlib.util.find_spec("swagger_ui")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / "static" / "swagger-ui-bundle.js").exists():
        raise ConfigError(
            "Swagger UI assets not found: install the 'swagger-ui-py' package "
            "(pip install -e .) for /docs"
        )
    return Path(locations[0]) / "static"


def _with_security_schemes(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[MUTUAL_TLS] = {
        "type": "mutualTLS",
        "description": "An operator client certificate (spiffe://<trust-domain>/operator/<name>) "
        "presented in the TLS handshake",
    }
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            security = operation.get("security") if isinstance(operation, dict) else None
            if security and {BEARER: []} in security and {MUTUAL_TLS: []} not in security:
                security.append({MUTUAL_TLS: []})
    app.openapi_schema = schema
    return schema


def install_docs(app: FastAPI) -> None:
    """Mount the Swagger UI assets and the ``/docs`` page; declare the security schemes."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")
    app.openapi = lambda: _with_security_schemes(app)  # type: ignore[method-assign]
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs(request: Request) -> HTMLResponse:
        return render(
            request,
            "docs.html",
            openapi_url=openapi_url,
            assets=DOCS_ASSETS,
            static=f"{CONSOLE_PREFIX}/static",
            title=app.title,
        )
