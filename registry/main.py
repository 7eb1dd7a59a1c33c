"""The registry FastAPI app: :func:`create_app` wires settings, database, CA and routes."""

from __future__ import annotations

import datetime as dt
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import anyio.to_thread
from fastapi import FastAPI
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from factory.ca import CertificateAuthority
from fleetcore.clock import utcnow
from fleetcore.profile import IdentityKind
from registry import operations
from registry.api.error_handlers import install_error_handlers
from registry.api.routes import (
    API_PREFIX,
    audit,
    claims,
    crl,
    devices,
    expiry,
    health,
    issuers,
    metrics,
    revocations,
    stats,
    tokens,
)
from registry.console import install_console
from registry.crl import CrlCache
from registry.db import make_engine, migrate
from registry.est.routes import install_est
from registry.feed import FeedNotifier
from registry.feedmark import MARK_FILE, FeedMark
from registry.issuer_revocations import IssuerRevocations
from registry.metrics import ExpiryCollector, RegistryMetrics, RequestMetricsMiddleware
from registry.planner import PlannerStatistics
from registry.settings import RegistrySettings
from registry.state import RegistryState
from registry.store.audit import Actor
from registry.store.supersede import SupersededRevocation
from registry.supersede import Confirmer, SupersedeWorker
from registry.verify import BatchVerifier

if TYPE_CHECKING:
    from registry.telemetry import TelemetryIngest

__all__ = ["API_PREFIX", "create_app"]

log = logging.getLogger(__name__)


#: HSTS on every answer of the HTTPS listener (not the plain-HTTP publication listener, where
#: browsers ignore it anyway and relying parties must keep plain HTTP). No includeSubDomains:
#: the registry does not own its parent domain's other hosts.
HSTS = b"max-age=31536000"


class StrictTransportSecurity:
    """Adds ``Strict-Transport-Security`` to every HTTP answer of the app it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"strict-transport-security", HSTS)]
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_with_hsts)


def _supersede_worker(state: RegistryState, crashed: Callable[[str], None]) -> SupersedeWorker:
    """The worker revoking superseded certificates, with a revocation's after-commit effects."""

    def revoked(events: Sequence[SupersededRevocation]) -> None:
        operations.superseded_revoked(state, events)

    return SupersedeWorker(
        state.engine,
        Actor(state.ca.identity(IdentityKind.SERVICE, "registry").uri),
        on_revoked=revoked,
        check_s=state.settings.registry_supersede_check_s,
        on_crash=crashed,
    )


def create_app(settings: RegistrySettings, *, migrate_schema: bool = True) -> FastAPI:
    """Build the app: open the database (migrating it), load the CA, mount the routes."""
    ca = CertificateAuthority.load(settings.layout, passphrase=settings.ca_passphrase_bytes)
    engine = make_engine(settings)
    if migrate_schema:
        migrate(engine)
    state = _registry_state(settings, engine, ca)
    if state.mark is not None and state.mark.check(engine):
        state.metrics.feed_restores.inc()
    app = FastAPI(
        title="certfleet registry",
        version="1",
        summary="Devices, certificates, revocation feed and CRL of a certfleet fleet.",
        lifespan=_lifespan(state, _supersede_worker(state, _crash_counter(state.metrics))),
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # /docs: registry.console.docs, from local assets
        redoc_url=None,
    )
    app.state.registry = state
    install_error_handlers(app)
    install_est(app, state)  # first: an enrollment's route is matched before the others'
    routers = (devices, audit, revocations, crl, stats, expiry, health, metrics, claims, tokens)
    for module in (*routers, issuers):  # issuers: issue 26
        app.include_router(module.router)
    install_console(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)
    app.add_middleware(StrictTransportSecurity)  # outermost: on error pages as well
    return app


def _crash_counter(registry_metrics: RegistryMetrics) -> Callable[[str], None]:
    """What a background task calls when it crashed (it is then restarted): a count by task."""

    def crashed(task: str) -> None:
        registry_metrics.task_crashes.labels(task).inc()

    return crashed


def _registry_state(
    settings: RegistrySettings, engine: Engine, ca: CertificateAuthority
) -> RegistryState:
    """The app's shared state: metrics, CRL cache, feed, planner statistics, verifier."""
    registry_metrics = RegistryMetrics()
    expiry_gauges = ExpiryCollector(engine, utcnow, settings.registry_expiry_metrics_cache_s)
    registry_metrics.registry.register(expiry_gauges)
    crashed = _crash_counter(registry_metrics)
    return RegistryState(
        settings=settings,
        engine=engine,
        ca=ca,
        feed=FeedNotifier(),
        crl=CrlCache(
            ca,
            engine,
            next_update=dt.timedelta(hours=settings.registry_crl_next_update_hours),
            base_interval=dt.timedelta(seconds=settings.registry_crl_base_interval_s),
            delta_next_update=dt.timedelta(seconds=settings.registry_crl_delta_next_update_s),
            per_change_entries=settings.registry_crl_per_change_entries,
            delta_max_entries=settings.registry_crl_delta_max_entries,
            on_resign=registry_metrics.crl_resigns.inc,
            on_delta=registry_metrics.crl_delta_signs.inc,
            on_failure=registry_metrics.crl_failures.inc,
            on_crash=crashed,
        ),
        metrics=registry_metrics,
        expiry_gauges=expiry_gauges,
        planner=PlannerStatistics(engine, on_crash=crashed),
        revoked_issuers=IssuerRevocations(engine),
        mark=FeedMark(settings.layout.root / MARK_FILE),
        verifier=BatchVerifier(
            ca.trusted_issuer_certs, ca.trust_domain, settings.registry_verify_processes, crashed
        ),
    )


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def _lifespan(state: RegistryState, supersede: SupersedeWorker) -> Lifespan:
    """Start the background parts with the app (feed listener, telemetry ingest, supersede
    worker) and stop them, then the state and the engine, when it stops."""
    settings, engine = state.settings, state.engine
    crashed = _crash_counter(state.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The pool is sized from the same number (registry.db.make_engine).
        anyio.to_thread.current_default_thread_limiter().total_tokens = (
            settings.registry_worker_threads
        )
        listener = None
        if engine.dialect.name == "postgresql":  # replicas may share it: hear their commits
            from registry.feed_listener import FeedListener

            listener = FeedListener(
                engine,
                state.feed,
                state.metrics,
                instance=settings.instance_name,
                on_crash=crashed,
            )
            listener.start()
        ingest = None
        if settings.telemetry_broker_addr:
            ingest = await _start_ingest(state, supersede, crashed)
            app.state.telemetry_ingest = ingest  # tests wait on its .subscribed
        supersede.start()
        if state.expiry_gauges is not None:
            state.expiry_gauges.warm()
        try:
            yield
        finally:
            state.feed.close()
            if listener is not None:
                listener.stop()
            if ingest is not None:
                await ingest.stop()
            supersede.stop()
            state.close()
            engine.dispose()

    return lifespan


async def _start_ingest(
    state: RegistryState, supersede: SupersedeWorker, crashed: Callable[[str], None]
) -> TelemetryIngest:
    """The telemetry ingest (MQTT client of the broker), renewals and confirms included."""
    from registry.telemetry import start_ingest

    settings, registry_metrics = state.settings, state.metrics
    started = start_ingest(
        settings,
        state.engine,
        state.ca,
        on_renewal_outcome=lambda outcome: registry_metrics.renewals.labels(outcome).inc(),
        on_crash=crashed,
        confirm=Confirmer(
            state.engine,
            supersede.actor,
            grace=dt.timedelta(seconds=settings.registry_supersede_grace_s),
            on_scheduled=supersede.wake,
        ),
        on_confirm_outcome=lambda outcome: registry_metrics.confirms.labels(outcome).inc(),
    )
    ingest = await started if inspect.isawaitable(started) else started
    registry_metrics.telemetry.attach(ingest)
    log.info("telemetry ingest started broker=%s", settings.telemetry_broker_addr)
    return ingest
