"""The publication listener: plain HTTP for relying parties that are not ours.

``--publish-addr`` / ``CERTFLEET_REGISTRY_PUBLISH_ADDR`` (off by default) serves the base
CRL at ``/crl.der`` and ``/crl.pem``, the delta CRL at ``/delta-crl.der`` and
``/delta-crl.pem`` (:mod:`registry.crl`), and the OCSP responder at ``/ocsp`` (POST, and
GET with the base64 request in the path, RFC 6960 appendix A). Everything served is signed
public data, so there is no TLS and no authentication here; the operator API stays on HTTPS.
It runs its own uvicorn server in a thread beside the HTTPS one, sharing the app's state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from fleetcore.errors import ConfigError
from fleetcore.publication import (
    CRL_PATH,
    CRL_PEM_PATH,
    DELTA_CRL_PATH,
    DELTA_CRL_PEM_PATH,
    OCSP_PATH,
)
from registry.api.error_handlers import install_error_handlers
from registry.issuer_crl import IssuerCrls
from registry.ocsp import OcspResponder
from registry.settings import split_addr
from registry.state import RegistryState

__all__ = ["MAX_OCSP_REQUEST", "PublicationServer", "create_publication_app"]

log = logging.getLogger(__name__)

#: An OCSP request for one certificate is ~100 bytes; anything above this is refused.
MAX_OCSP_REQUEST = 16 * 1024
_STARTUP_TIMEOUT = 15.0
_SHUTDOWN_TIMEOUT = 10.0
_OCSP_RESPONSE = "application/ocsp-response"


def create_publication_app(state: RegistryState, responder: OcspResponder) -> FastAPI:
    """The CRL and OCSP routes over ``state`` (the HTTPS app's state, shared)."""
    app = FastAPI(title="certfleet publication", openapi_url=None, docs_url=None, redoc_url=None)
    # The same answers as the HTTPS app when the CRL cannot be signed or the database is down
    # (the handlers count on app.state.registry).
    app.state.registry = state
    install_error_handlers(app)

    @app.get(CRL_PATH)
    def crl_der() -> Response:
        return Response(state.crl.current().der, media_type="application/pkix-crl")

    @app.get(CRL_PEM_PATH)
    def crl_pem() -> Response:
        return Response(state.crl.current().pem, media_type="application/x-pem-file")

    issuer_crls = IssuerCrls(
        state.ca,
        state.engine,
        state.crl,
        dt.timedelta(hours=state.settings.registry_crl_next_update_hours),
    )

    @app.get("/crl/{key_id}.der")
    def issuer_crl_der(key_id: str) -> Response:
        return Response(issuer_crls.der(key_id), media_type="application/pkix-crl")

    @app.get("/crl/{key_id}.pem")
    def issuer_crl_pem(key_id: str) -> Response:
        return Response(issuer_crls.pem(key_id), media_type="application/x-pem-file")

    @app.get("/crls.pem")
    def all_crls_pem() -> Response:
        return Response(issuer_crls.all_pem(), media_type="application/x-pem-file")

    @app.get(DELTA_CRL_PATH)
    def delta_crl_der() -> Response:
        return Response(state.crl.delta().der, media_type="application/pkix-crl")

    @app.get(DELTA_CRL_PEM_PATH)
    def delta_crl_pem() -> Response:
        return Response(state.crl.delta().pem, media_type="application/x-pem-file")

    @app.post(OCSP_PATH)
    async def ocsp_post(request: Request) -> Response:
        body = await _bounded_body(request)
        if body is None:
            return Response("OCSP request too large\n", status_code=413, media_type="text/plain")
        return Response(await run_in_threadpool(responder.respond, body), media_type=_OCSP_RESPONSE)

    @app.get(OCSP_PATH + "/{encoded:path}")
    async def ocsp_get(encoded: str) -> Response:
        try:
            # Starlette has already percent-decoded the path; base64 may lose its padding.
            der = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        return Response(await run_in_threadpool(responder.respond, der), media_type=_OCSP_RESPONSE)

    return app


async def _bounded_body(request: Request) -> bytes | None:
    """The request body, or None once it exceeds MAX_OCSP_REQUEST (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_OCSP_REQUEST:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_OCSP_REQUEST:
            return None
    return bytes(body)


class PublicationServer:
    """The publication app on its own plain-HTTP socket, uvicorn in a background thread."""

    def __init__(self, state: RegistryState, addr: str) -> None:
        self.addr = addr
        self.responder = OcspResponder(
            state.ca,
            state.engine,
            answer_validity=dt.timedelta(seconds=state.settings.registry_ocsp_next_update_s),
            revoked_issuers=state.revoked_issuers,
        )
        self.app = create_publication_app(state, self.responder)
        self.config = uvicorn.Config(
            self.app,
            lifespan="off",
            proxy_headers=False,  # the peer is the client (registry.server.uvicorn_config)
            forwarded_allow_ips=[],
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> PublicationServer:
        host, port = split_addr(self.addr)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on --publish-addr {self.addr}: {exc.strerror}"
            ) from None
        self._socket = sock
        bound_host, bound_port = sock.getsockname()[:2]
        shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
        self.url = (
            f"http://{shown}:{bound_port}" if ":" not in shown else f"http://[{shown}]:{bound_port}"
        )
        self.responder.responder_certificate  # noqa: B018 - issue it now, not on the 1st request
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[sock])),
            name="registry-publication",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise ConfigError(f"publication listener did not start on {self.addr}")
            time.sleep(0.02)
        log.info(
            "publication listening url=%s crl=%s delta_crl=%s ocsp=%s",
            self.url,
            CRL_PATH,
            DELTA_CRL_PATH,
            OCSP_PATH,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_SHUTDOWN_TIMEOUT)
        if self._socket is not None:
            self._socket.close()
