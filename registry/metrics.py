"""Prometheus metrics of one registry app (its own CollectorRegistry, so apps don't clash),
and the collectors read at scrape time: the telemetry ingest's counters and the fleet's
expiry (:class:`ExpiryCollector`, docs/lifecycle.md)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlmodel import Session

from registry.stale_while_revalidate import StaleWhileRevalidate
from registry.store.expiry import WINDOWS, ExpiryCounts, expiry_counts

if TYPE_CHECKING:
    from registry.telemetry import TelemetryIngest

__all__ = ["ExpiryCollector", "RegistryMetrics", "RequestMetricsMiddleware", "TelemetryCollector"]

#: Why the ingest drops a message (``registry.telemetry.TelemetryRejected.reason``).
TELEMETRY_DROP_REASONS = (
    "bad_topic",
    "too_large",
    "malformed_json",
    "device_mismatch",
    "retained_renewal",
    "retained",
)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RegistryMetrics:
    """Requests, device lifecycle, renewals, CRL signing, the feed, the database pool."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_metrics()
        self._lifecycle_metrics()
        self._crl_metrics()
        self._feed_metrics()
        self._failure_metrics()
        self.telemetry = TelemetryCollector()
        self.registry.register(self.telemetry)

    def _request_metrics(self) -> None:
        """HTTP requests answered, their time and the authentication refusals."""
        self.requests = Counter(
            "certfleet_registry_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "certfleet_registry_request_seconds",
            "time to the start of the response (long-polls included), by route template",
            ["route"],
            registry=self.registry,
        )
        self.auth_refusals = Counter(
            "certfleet_registry_auth_refusals",
            "requests refused by authentication or authorization, by reason",
            ["reason"],
            registry=self.registry,
        )

    def _lifecycle_metrics(self) -> None:
        """Registrations, re-enrollments, decommissions, renewals and their confirms."""
        self.registrations = Counter(
            "certfleet_registry_registrations",
            "device certificates newly registered",
            registry=self.registry,
        )
        self.reenrollments = Counter(
            "certfleet_registry_reenrollments",
            "devices whose certificates had all expired, given a new one by an operator",
            registry=self.registry,
        )
        self.decommissions = Counter(
            "certfleet_registry_decommissions",
            "devices decommissioned",
            registry=self.registry,
        )
        self.renewals = Counter(
            "certfleet_registry_renewals",
            "certificate renewals over MQTT, by outcome (issued, repeated, claimed_elsewhere, "
            "or the refusal code)",
            ["outcome"],
            registry=self.registry,
        )
        self.superseded = Counter(
            "certfleet_registry_superseded_revocations",
            "older certificates of renewed devices revoked with reason superseded",
            registry=self.registry,
        )
        self.confirms = Counter(
            "certfleet_registry_renewal_confirms",
            "renewal confirms over MQTT, by outcome (confirmed, or the refusal code)",
            ["outcome"],
            registry=self.registry,
        )

    def _crl_metrics(self) -> None:
        """CRL signings and their failures."""
        self.crl_resigns = Counter(
            "certfleet_registry_crl_resigns",
            "times the (base) CRL was signed",
            registry=self.registry,
        )
        self.crl_delta_signs = Counter(
            "certfleet_registry_crl_delta_signs",
            "times the delta CRL was signed",
            registry=self.registry,
        )
        self.crl_failures = Counter(
            "certfleet_registry_crl_sign_failures",
            "CRL signings that failed (database unreachable); the signer retries",
            registry=self.registry,
        )

    def _feed_metrics(self) -> None:
        """The revocation feed: long-poll waiters, restores, its PostgreSQL listener."""
        self.feed_waiters = Gauge(
            "certfleet_registry_feed_waiters",
            "long-poll requests currently waiting on the revocation feed",
            registry=self.registry,
        )
        self.feed_restores = Counter(
            "certfleet_registry_feed_restores",
            "starts on a database restored from an older copy (feed head below the mark)",
            registry=self.registry,
        )
        self.feed_notifications = Counter(
            "certfleet_registry_feed_notifications",
            "PostgreSQL feed notifications received (a revocation committed by any replica)",
            registry=self.registry,
        )
        self.feed_listener_reconnects = Counter(
            "certfleet_registry_feed_listener_reconnects",
            "times the feed's PostgreSQL LISTEN connection was lost and opened again",
            registry=self.registry,
        )
        self.feed_listener_connected = Gauge(
            "certfleet_registry_feed_listener_connected",
            "1 while the feed's PostgreSQL LISTEN connection is open (0 on SQLite or while lost)",
            registry=self.registry,
        )

    def _failure_metrics(self) -> None:
        """Clients that hung up, a full database pool, crashed background tasks."""
        self.client_disconnects = Counter(
            "certfleet_registry_client_disconnects",
            "requests whose client hung up before the request was read, by listener",
            ["listener"],
            registry=self.registry,
        )
        self.pool_exhausted = Counter(
            "certfleet_registry_db_pool_exhausted",
            "requests answered 503 because no pooled database connection was free in time",
            registry=self.registry,
        )
        self.task_crashes = Counter(
            "certfleet_registry_task_crashes",
            "background task crashes (each logged with its traceback and restarted), by task",
            ["task"],
            registry=self.registry,
        )


class TelemetryCollector(Collector):
    """The telemetry ingest's counters, read at scrape time.

    The ingest counts in plain attributes (``TelemetryIngest.counters``) on its own threads, so
    receiving a message costs no Prometheus call; this collector turns them into metrics when
    ``/metrics`` is read. Without a running ingest it yields nothing.
    """

    def __init__(self) -> None:
        self.ingest: TelemetryIngest | None = None

    def attach(self, ingest: TelemetryIngest) -> None:
        self.ingest = ingest

    def collect(self) -> Iterator[Metric]:
        ingest = self.ingest
        if ingest is None:
            return
        counters = ingest.counters
        prefix = "certfleet_registry_telemetry"

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{prefix}_{name}", doc, value=value)

        yield counter(
            "messages_received", "telemetry messages received from the broker", counters.received
        )
        yield counter(
            "messages_accepted", "telemetry messages accepted into the buffer", counters.accepted
        )
        dropped = CounterMetricFamily(
            f"{prefix}_messages_dropped",
            "telemetry messages dropped, by reason (malformed_json, device_mismatch, ...)",
            labels=["reason"],
        )
        for reason in TELEMETRY_DROP_REASONS:  # never iterates the dict paho's thread writes
            dropped.add_metric([reason], counters.rejected.get(reason, 0))
        yield dropped
        yield counter("flushes", "batched telemetry writes committed", counters.flushes)
        yield counter("flush_errors", "batched telemetry writes that failed", counters.flush_errors)
        yield counter(
            "devices_updated",
            "device rows updated with last seen time and telemetry",
            counters.rows_written,
        )
        yield SummaryMetricFamily(
            f"{prefix}_flush_seconds",
            "time of one committed batched telemetry write",
            count_value=counters.flushes,
            sum_value=counters.flush_seconds_total,
        )
        yield GaugeMetricFamily(
            f"{prefix}_flush_seconds_max",
            "longest committed batched telemetry write so far",
            value=counters.flush_seconds_max,
        )
        yield counter("connects", "connections to the broker established", counters.connects)
        yield counter(
            "subscribe_checks",
            "watchdog re-subscriptions the broker acknowledged in full",
            counters.subscribe_checks,
        )
        yield counter(
            "callback_errors",
            "received messages whose handling raised (logged with traceback; the client lives)",
            counters.callback_errors,
        )
        yield counter(
            "subscribe_failures",
            "SUBACKs refused or missing (a lost subscription): logged, retried, alerted on",
            counters.subscribe_failures,
        )
        yield GaugeMetricFamily(
            f"{prefix}_connected",
            "1 while the ingest is connected to the broker",
            value=1.0 if ingest.connected.is_set() else 0.0,
        )
        yield GaugeMetricFamily(
            f"{prefix}_subscribed",
            "1 while the broker has acknowledged every subscription of the ingest",
            value=1.0 if ingest.subscribed.is_set() else 0.0,
        )


class ExpiryCollector(Collector):
    """The expiry gauges of ``/metrics``, from :func:`expiry_counts`, reused for ``cache_s``
    seconds (several scrapers, one query). Once computing them is expensive (a large fleet:
    about 3 s at 1,000,000 devices on SQLite) a scrape answers the last numbers and they are
    recomputed in the background (:mod:`registry.stale_while_revalidate`), so a scrape never
    waits for the aggregate; a change (:meth:`invalidate`) makes the next scrape recompute."""

    def __init__(
        self, engine: Engine, clock: Callable[[], dt.datetime], cache_s: float = 15.0
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._counts = StaleWhileRevalidate(
            self._compute, max_age_s=cache_s, fresh_s=cache_s, name="expiry gauges"
        )

    def warm(self) -> None:
        """Compute the gauges in the background now (the registry's start: the first
        scrape then does not wait for the aggregate, about 2 s at 1,000,000 devices)."""
        self._counts.warm()

    def _compute(self) -> ExpiryCounts:
        with Session(self._engine) as session:
            return expiry_counts(session, self._clock())

    def counts(self) -> ExpiryCounts:
        """The numbers the gauges show (module doc: fresh, cached or last while refreshed)."""
        return self._counts.get()

    def invalidate(self) -> None:
        """The numbers changed (a renewal or decommission): recompute at the next scrape."""
        self._counts.invalidate()

    def collect(self) -> Iterator[Metric]:
        counts = self.counts()
        within = GaugeMetricFamily(
            "certfleet_certificates_expiring",
            "active devices whose current certificate expires within the window (not yet expired)",
            labels=["within"],
        )
        for label, _ in WINDOWS:
            within.add_metric([label], counts.within[label])
        yield within
        yield GaugeMetricFamily(
            "certfleet_devices_without_valid_certificate",
            "active devices with no live certificate that has not expired",
            value=counts.without_valid_certificate,
        )
        yield GaugeMetricFamily(
            "certfleet_devices_active", "devices registered and active", value=counts.active_devices
        )
        yield GaugeMetricFamily(
            "certfleet_certificate_next_expiration_timestamp_seconds",
            "earliest not_after among the current certificates of active devices not yet "
            "expired (0: none)",
            value=counts.next_expiry.timestamp() if counts.next_expiry else 0.0,
        )


class RequestMetricsMiddleware:
    """Pure ASGI middleware counting requests by route template and status."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: RegistryMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            route = getattr(scope.get("route"), "path", "unmatched")
            self._metrics.requests.labels(scope["method"], route, str(status)).inc()
            self._metrics.request_seconds.labels(route).observe(time.perf_counter() - started)

        async def send_counted(message: Message) -> None:
            # Counted when the response starts, so a client never sees it before the count.
            if message["type"] == "http.response.start" and not counted:
                count(int(message["status"]))
            await send(message)

        try:
            await self._app(scope, receive, send_counted)
        finally:
            if not counted:
                count(500)
