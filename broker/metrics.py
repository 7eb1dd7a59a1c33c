"""Prometheus metrics of one broker, served on their own loopback HTTP port, with
``/healthz`` beside ``/metrics``.

Each :class:`BrokerMetrics` has its own ``CollectorRegistry`` so several brokers (tests)
can live in one process. ``/healthz`` answers 200 ``{"status": "ok", "problems": []}`` or
503 ``{"status": "degraded", "problems": [...]}`` from the health check the broker passes
to :meth:`BrokerMetrics.serve` (the revoked set not persisted, a background task failing).
``/readyz`` answers 200 ``{"status": "ready", "waiting_for": []}`` once the broker takes
traffic as intended (listening, following the revocation feed), else 503
``{"status": "not ready", "waiting_for": [...]}``: for a load balancer or an orchestrator.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from broker.loop_lag import LAG_BUCKETS

__all__ = ["BrokerMetrics", "HealthCheck"]

#: Returns the broker's current problems, one short sentence each; empty = healthy.
HealthCheck = Callable[[], list[str]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        """Scrapes are not log lines."""


class BrokerMetrics:
    """Connections, refusals by reason, messages, ACL refusals, revocation lag."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._client_metrics(self.registry)
        self._revocation_metrics(self.registry)
        self._failure_metrics(self.registry)
        self._cluster_metrics(self.registry)
        self._shared_metrics(self.registry)
        self._state_metrics(self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _client_metrics(self, r: CollectorRegistry) -> None:
        """Connections, admissions, refusals, messages and ACL decisions."""
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

    def _revocation_metrics(self, r: CollectorRegistry) -> None:
        """The revoked set, the revocation feed and its lag."""
        self.sessions_dropped = Counter(
            "certfleet_broker_revoked_sessions_dropped",
            "Live sessions dropped because their certificate was revoked",
            registry=r,
        )
        self.revoked_serials = Gauge(
            "certfleet_broker_revoked_serials", "Serials in the revoked set", registry=r
        )
        self.revoked_expired = Counter(
            "certfleet_broker_revoked_serials_expired",
            "Serials dropped from the revoked set after their certificate expired (+ skew)",
            registry=r,
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
        self.feed_last_success = Gauge(
            "certfleet_broker_revocation_feed_last_success_timestamp_seconds",
            "When the registry's revocation feed last answered (0: never, or no feed)",
            registry=r,
        )
        self.loop_lag = Histogram(
            "certfleet_broker_loop_lag_seconds",
            "How late the event loop ran a timer due every 10 ms (broker.loop_lag)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "certfleet_broker_gc_pause_seconds",
            "How long each cyclic garbage collection held the process (broker.gc_pauses)",
            ["generation"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.revoked_persisted = Gauge(
            "certfleet_broker_revoked_set_persisted",
            "1 when the revoked set on disk is up to date, 0 while writes fail (retried)",
            registry=r,
        )
        self.revoked_persisted.set(1)
        self.persist_failures = Counter(
            "certfleet_broker_revoked_set_write_failures",
            "Failed writes of the revoked set file (enforcement goes on in memory)",
            registry=r,
        )

    def _failure_metrics(self, r: CollectorRegistry) -> None:
        """Background tasks restarted, connections and routes that raised."""
        self.task_restarts = Counter(
            "certfleet_broker_task_restarts",
            "Background tasks that failed and were restarted, by task",
            ["task"],
            registry=r,
        )
        self.connection_errors = Counter(
            "certfleet_broker_connection_errors",
            "Connections whose task ended with an unexpected error (logged; the socket closed)",
            registry=r,
        )
        self.route_errors = Counter(
            "certfleet_broker_route_errors",
            "Messages whose routing raised (logged; routing goes on)",
            registry=r,
        )

    def _cluster_metrics(self, r: CollectorRegistry) -> None:
        """The NATS link and the messages it carries."""
        self.cluster_connected = Gauge(
            "certfleet_broker_cluster_connected",
            "1 while this node's NATS link is up and NATS answers (cluster mode), else 0",
            registry=r,
        )
        self.cluster_stalls = Counter(
            "certfleet_broker_cluster_stalls",
            "Times NATS stopped answering on an open connection (frozen, partitioned)",
            registry=r,
        )
        self.cluster_streams_missing = Counter(
            "certfleet_broker_cluster_streams_missing",
            "Times a stream or bucket of the cluster was found deleted (then made again)",
            registry=r,
        )
        self.cluster_connects = Counter(
            "certfleet_broker_cluster_connects",
            "NATS connections made (the first one and every reconnect)",
            registry=r,
        )
        self.cluster_forwarded = Counter(
            "certfleet_broker_cluster_forwarded",
            "Messages published to NATS for the other nodes",
            registry=r,
        )
        self.cluster_received = Counter(
            "certfleet_broker_cluster_received",
            "Messages received from the other nodes, one per local filter that wanted them",
            registry=r,
        )
        self.cluster_not_forwarded = Counter(
            "certfleet_broker_cluster_not_forwarded",
            "Messages delivered on this node only, because NATS was unreachable",
            registry=r,
        )
        self.cluster_stored = Counter(
            "certfleet_broker_cluster_stored",
            "QoS 1 messages stored in JetStream (each one's PUBACK waited for it)",
            registry=r,
        )
        self.cluster_store_retries = Counter(
            "certfleet_broker_cluster_store_retries",
            "Failed JetStream stores retried (their PUBACK withheld meanwhile)",
            registry=r,
        )

    def _shared_metrics(self, r: CollectorRegistry) -> None:
        """Shared subscriptions across members and nodes."""
        self.shared_handed_over = Counter(
            "certfleet_broker_shared_handed_over",
            "Shared-subscription QoS 1 messages a member left unacknowledged, given to another",
            registry=r,
        )
        self.shared_lost = Counter(
            "certfleet_broker_shared_lost",
            "Shared-subscription QoS 1 messages dropped: no member anywhere to take them",
            registry=r,
        )
        self.shared_remote = Counter(
            "certfleet_broker_shared_remote",
            "Shared-subscription messages sent through NATS to another node's member",
            registry=r,
        )

    def _state_metrics(self, r: CollectorRegistry) -> None:
        """The saved broker state (persistent sessions, retained messages)."""
        self.state_persisted = Gauge(
            "certfleet_broker_state_persisted",
            "1 when the persistent sessions and retained messages on disk are current, else 0",
            registry=r,
        )
        self.state_persist_failures = Counter(
            "certfleet_broker_state_persist_failures",
            "Writes of the broker state file that failed (retried)",
            registry=r,
        )
        self.state_load_failures = Counter(
            "certfleet_broker_state_load_failures",
            "Broker state files found unusable at start (moved aside)",
            registry=r,
        )
        self.state_sessions = Gauge(
            "certfleet_broker_state_sessions",
            "Persistent sessions in the last saved state",
            registry=r,
        )
        self.state_queued = Gauge(
            "certfleet_broker_state_queued_messages",
            "Messages queued for persistent sessions in the last saved state",
            registry=r,
        )

    def count_acl(self, action: str, allowed: bool) -> None:
        """One topic ACL decision: a refusal by action, or a message in (publish) or out
        (receive)."""
        if not allowed:
            self.acl_refusals.labels(action).inc()
        elif action == "publish":
            self.messages_in.inc()
        elif action == "receive":
            self.messages_out.inc()

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

    def serve(
        self, host: str, port: int, health: HealthCheck = list, readiness: HealthCheck = list
    ) -> int:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (0 = ephemeral);
        return the port."""
        metrics_app = make_wsgi_app(self.registry)
        checks = {
            "/healthz": (health, "problems", "ok", "degraded"),
            "/readyz": (readiness, "waiting_for", "ready", "not ready"),
        }

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            check = checks.get(str(environ.get("PATH_INFO")))
            if check is None:
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            run, key, good, bad = check
            found = run()
            body = {"status": bad if found else good, key: found}
            status = "503 Service Unavailable" if found else "200 OK"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]

        server = make_server(
            host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever, name="certfleet-broker-metrics", daemon=True
        )
        thread.start()
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
