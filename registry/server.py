"""Serving the registry over HTTPS with uvicorn: in a thread (tests, demo) or as a process.

``RegistryServer(settings)`` is a context manager running uvicorn in a thread, with ``.url``;
:func:`serve` runs in the foreground and writes the ``--ready-file`` once listening.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

import uvicorn
from fastapi import FastAPI

from factory.ca import CertificateAuthority, write_issued
from fleetcore.errors import ConfigError
from fleetcore.layout import write_public
from fleetcore.tls import TrustFile
from registry.main import create_app
from registry.publication import PublicationServer
from registry.settings import RegistrySettings, split_addr
from registry.state import RegistryState
from registry.tls import PeerCertH11Protocol, registry_server_context

__all__ = ["RegistryServer", "ensure_server_certificate", "serve", "uvicorn_config"]

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 15.0


def ensure_server_certificate(settings: RegistrySettings, ca: CertificateAuthority) -> None:
    """Issue ``tls/<name>.crt|.key`` for localhost/127.0.0.1 (and the listen host) if absent."""
    layout = settings.layout
    name = settings.registry_tls_name
    cert, key = layout.server_cert(name), layout.server_key(name)
    if cert.exists() and key.exists():
        return
    host, _ = split_addr(settings.registry_addr)
    ips, dns = ["127.0.0.1"], ["localhost"]
    try:
        if str(ipaddress.ip_address(host)) not in ("127.0.0.1", "0.0.0.0", "::"):
            ips.append(host)
    except ValueError:
        dns.append(host)
    issued = ca.issue_server(name, dns_names=dns, ip_addresses=ips)
    write_issued(issued, cert, key, intermediate=ca.issuing_cert)
    log.info("server certificate issued name=%s path=%s dns=%s ip=%s", name, cert, dns, ips)


def _bind(settings: RegistrySettings) -> socket.socket:
    host, port = split_addr(settings.registry_addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {settings.registry_addr}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(settings: RegistrySettings, app: FastAPI) -> uvicorn.Config:
    """uvicorn over TLS 1.2+, client certificate optional, peer certificate in the scope."""
    layout = settings.layout
    state: RegistryState = app.state.registry
    ensure_server_certificate(settings, state.ca)

    def ssl_context(
        _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        context = registry_server_context(layout, settings.registry_tls_name)
        # After a rollover (trust.pem changed) the next handshake trusts the new issuing CA:
        # the check runs at the ClientHello, before the client certificate is verified.
        trust = TrustFile(lambda: layout.server_trust, context)
        context.sni_callback = lambda _sock, _name, _ctx: (trust.check(), None)[1]
        return context

    return uvicorn.Config(
        app,
        http=PeerCertH11Protocol,
        ssl_context_factory=ssl_context,
        lifespan="on",
        # X-Forwarded-For is read by registry.auth.forwarded_for, from the operator's trusted
        # proxies only: uvicorn's default believes it from 127.0.0.1 (any local process).
        proxy_headers=False,
        forwarded_allow_ips=[],
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=30,
    )


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"


class RegistryServer:
    """The registry on a real HTTPS socket, uvicorn running in a background thread."""

    def __init__(self, settings: RegistrySettings, app: FastAPI | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else create_app(settings)
        self._started = threading.Event()
        self._server = _Server(uvicorn_config(settings, self.app), self._started.set)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.publication: PublicationServer | None = None

    @property
    def state(self) -> RegistryState:
        state: RegistryState = self.app.state.registry
        return state

    def __enter__(self) -> RegistryServer:
        self._socket = _bind(self.settings)
        self.url = _url(self._socket)
        sockets = [self._socket]
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=sockets)),
            name="registry-uvicorn",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._started.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise ConfigError(f"registry did not start on {self.settings.registry_addr}")
        log.info("registry listening url=%s", self.url)
        if self.settings.registry_publish_addr:
            try:
                self.publication = PublicationServer(
                    self.state, self.settings.registry_publish_addr
                ).__enter__()
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.publication is not None:
            self.publication.__exit__(None, None, None)
        self.state.feed.close()  # long-polls return now instead of holding the shutdown
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT)
        if self._socket is not None:
            self._socket.close()


def write_ready_file(path: Path, url: str) -> None:
    write_public(path, json.dumps({"url": url, "pid": os.getpid()}).encode())


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_started`` once its sockets listen.

    At shutdown it first releases the feed's long-polls: uvicorn waits for open connections
    before it runs the lifespan shutdown, so a waiting follower would otherwise hold the
    shutdown until ``timeout_graceful_shutdown`` and end in a cancelled-task traceback.
    """

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        state = getattr(getattr(app, "state", None), "registry", None)
        if isinstance(state, RegistryState):
            state.feed.close()
        await super().shutdown(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def _exit_quietly(signum: int, _frame: FrameType | None) -> None:
    log.info("registry stopped signal=%s", signal.Signals(signum).name)
    raise SystemExit(0)


def serve(settings: RegistrySettings, ready_file: Path | None = None) -> None:
    """Run the registry in the foreground until SIGINT/SIGTERM."""
    app = create_app(settings)
    config = uvicorn_config(settings, app)
    sock = _bind(settings)
    url = _url(sock)

    def on_ready() -> None:
        if ready_file is not None:
            write_ready_file(ready_file, url)
        log.info("registry listening url=%s pid=%d", url, os.getpid())
        print(url, flush=True)

    server = _Server(config, on_ready)
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown), then re-raises the signal with the
    # previous handlers back: make that a clean exit instead of a traceback or a kill.
    previous = signal.signal(signal.SIGTERM, _exit_quietly)
    publication: PublicationServer | None = None
    try:
        if settings.registry_publish_addr:
            publication = PublicationServer(app.state.registry, settings.registry_publish_addr)
            publication.__enter__()
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        log.info("registry stopped signal=SIGINT")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if publication is not None:
            publication.__exit__(None, None, None)
        sock.close()
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
