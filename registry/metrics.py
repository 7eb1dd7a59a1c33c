"""Prometheus metrics of one registry app (its own CollectorRegistry, so apps don't clash)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RegistryMetrics", "RequestMetricsMiddleware"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RegistryMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.registrations = Counter(
            "certfleet_registry_registrations",
            "device certificates newly registered",
            registry=self.registry,
        )
        self.decommissions = Counter(
            "certfleet_registry_decommissions",
            "devices decommissioned",
            registry=self.registry,
        )
        self.feed_waiters = Gauge(
            "certfleet_registry_feed_waiters",
            "long-poll requests currently waiting on the revocation feed",
            registry=self.registry,
        )
        self.renewals = Counter(
            "certfleet_registry_renewals",
            "certificate renewals over MQTT, by outcome (issued, repeated, or the refusal code)",
            ["outcome"],
            registry=self.registry,
        )
        self.crl_resigns = Counter(
            "certfleet_registry_crl_resigns",
            "times the CRL was signed",
            registry=self.registry,
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
