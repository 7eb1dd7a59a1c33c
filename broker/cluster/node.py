"""One broker node's cluster side, built from the broker's settings.

:func:`cluster_options` turns ``CERTFLEET_BROKER_CLUSTER_*`` settings into
:class:`~broker.cluster.link.ClusterOptions` (None without ``--cluster``: a single node);
:class:`ClusterNode` wires the link and the router into one broker, through its
:class:`~broker.broker_port.BrokerPort` (docs/cluster.md, "The broker seam"), and reports
the link's state to the metrics, ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.broker_port import BrokerPort
from broker.cluster.durable import DurableSessions
from broker.cluster.link import ClusterLink, ClusterOptions
from broker.cluster.retained import RetainedSync
from broker.cluster.router import ClusterRouter
from broker.cluster.shared import ClusterShared
from broker.metrics import BrokerMetrics
from broker.settings import BrokerSettings

__all__ = ["ClusterNode", "cluster_options"]

log = logging.getLogger(__name__)


def cluster_options(settings: BrokerSettings) -> ClusterOptions | None:
    """The NATS connection this node uses; None when it runs alone."""
    if not settings.broker_cluster_url:
        return None
    password = settings.broker_cluster_password
    return ClusterOptions(
        url=settings.broker_cluster_url,
        node=settings.broker_node,
        user=settings.broker_cluster_user,
        password=password.get_secret_value() if password is not None else None,
        nkey_seed_file=settings.broker_cluster_nkey_seed_file,
        ca_file=settings.broker_cluster_ca_file,
        max_backoff_s=settings.broker_cluster_max_backoff_s,
        stall_s=settings.broker_cluster_stall_s,
    )


class ClusterNode:
    """The link to NATS and the router of one node."""

    def __init__(
        self,
        options: ClusterOptions,
        metrics: BrokerMetrics,
        *,
        session_expiry_s: float,
        shared_prefer_local: bool = True,
    ) -> None:
        self.metrics = metrics
        self.session_expiry_s = session_expiry_s
        self.shared_prefer_local = shared_prefer_local
        self.shared: ClusterShared | None = None
        self.link = ClusterLink(
            options,
            on_state=self._link_state,
            on_stall=self._link_stalled,
            on_missing=metrics.cluster_streams_missing.inc,
        )
        self.router: ClusterRouter | None = None
        self.durable: DurableSessions | None = None

    def _link_state(self, connected: bool) -> None:
        self.metrics.cluster_connected.set(1 if connected else 0)
        if connected:
            self.metrics.cluster_connects.inc()

    def _link_stalled(self, stalled: bool) -> None:
        if stalled:
            self.metrics.cluster_stalls.inc()
        self.metrics.cluster_connected.set(0 if stalled or not self.link.connected else 1)

    def attach(self, broker: BrokerPort, close_session: Callable[[str], bool]) -> None:
        """Run ``broker`` as a node of the cluster (before its listener takes clients)."""
        metrics = self.metrics
        self.router = ClusterRouter(
            self.link,
            broker.deliver_remote,
            on_forwarded=metrics.cluster_forwarded.inc,
            on_not_forwarded=metrics.cluster_not_forwarded.inc,
            on_received=metrics.cluster_received.inc,
        )
        self.durable = DurableSessions(
            self.link,
            self.router,
            broker,
            close_connection=close_session,
            session_expiry_s=self.session_expiry_s,
            on_stored=metrics.cluster_stored.inc,
            on_store_retry=metrics.cluster_store_retries.inc,
        )
        broker.use_cluster(self.durable)
        self.shared = ClusterShared(
            self.link,
            broker.shared,
            prefer_local=self.shared_prefer_local,
            on_sent=metrics.shared_remote.inc,
        )
        broker.share_retained_with(RetainedSync(self.link, broker).publish)

    def start(self) -> None:
        self.link.start()
        if self.durable is not None:
            self.durable.start()

    async def stop(self) -> None:
        # The link first: it cancels a connection's setup still running, which would
        # otherwise start the durable sessions' watchers after they were closed (and leave
        # their tasks pending when the loop ends).
        await self.link.close()
        if self.shared is not None:
            await self.shared.close()
        if self.durable is not None:
            await self.durable.close()

    def problems(self) -> list[str]:
        return self.link.problems()
