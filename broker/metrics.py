"""Prometheus metrics of one broker, served on their own loopback HTTP port.

Each :class:`BrokerMetrics` has its own ``CollectorRegistry`` so several brokers (tests)
can live in one process.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["BrokerMetrics"]


class BrokerMetrics:
    """Connections, refusals by reason, messages, ACL refusals, revocation lag."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "certfleet_broker_connections", "Admitted MQTT sessions currently open", registry=r
        )
        self.tls_connections = Gauge(
            "certfleet_broker_tls_connections",
            "TCP connections currently open (handshaking or admitted)",
            registry=r,
        )
        self.admitted = Counter(
            "certfleet_broker_admitted", "Clients admitted after CONNECT", registry=r
        )
        self.refusals = Counter(
            "certfleet_broker_refusals",
            "Clients refused, in the TLS handshake or at CONNECT, by reason",
            ["reason"],
            registry=r,
        )
        self.messages_in = Counter(
            "certfleet_broker_messages_in", "PUBLISH packets accepted from clients", registry=r
        )
        self.messages_out = Counter(
            "certfleet_broker_messages_out", "Messages routed to subscribers", registry=r
        )
        self.acl_refusals = Counter(
            "certfleet_broker_acl_refusals",
            "Publish/subscribe/receive refused by the topic ACL",
            ["action"],
            registry=r,
        )
        self.sessions_dropped = Counter(
            "certfleet_broker_revoked_sessions_dropped",
            "Live sessions dropped because their certificate was revoked",
            registry=r,
        )
        self.revoked_serials = Gauge(
            "certfleet_broker_revoked_serials", "Serials in the revoked set", registry=r
        )
        self.revocation_seq = Gauge(
            "certfleet_broker_revocation_seq", "Last revocation feed sequence applied", registry=r
        )
        self.revocation_lag = Histogram(
            "certfleet_broker_revocation_lag_seconds",
            "Time from the registry's revoked_at to the broker applying the revocation",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0),
            registry=r,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def refusal_count(self, reason: str) -> float:
        """Current value of the refusal counter for ``reason`` (tests, CLI)."""
        value = self.registry.get_sample_value(
            "certfleet_broker_refusals_total", {"reason": reason}
        )
        return value or 0.0

    def acl_refusal_count(self, action: str) -> float:
        value = self.registry.get_sample_value(
            "certfleet_broker_acl_refusals_total", {"action": action}
        )
        return value or 0.0

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0 = ephemeral); return the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
