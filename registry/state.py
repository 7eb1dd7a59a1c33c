"""What one running registry app holds: settings, engine, CA, feed notifier, CRL, metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from factory.ca import CertificateAuthority
from registry.crl import CrlCache
from registry.feed import FeedAnswer, FeedKey, FeedNotifier, SharedReads
from registry.feedmark import FeedMark
from registry.issuer_revocations import IssuerRevocations
from registry.metrics import ExpiryCollector, RegistryMetrics
from registry.planner import PlannerStatistics
from registry.settings import RegistrySettings
from registry.stale_while_revalidate import StaleWhileRevalidate
from registry.verify import BatchVerifier

__all__ = ["RegistryState"]


@dataclass
class RegistryState:
    settings: RegistrySettings
    engine: Engine
    ca: CertificateAuthority
    feed: FeedNotifier
    crl: CrlCache
    metrics: RegistryMetrics
    verifier: BatchVerifier
    planner: PlannerStatistics
    #: Issuing CAs revoked by the root: their certificates are refused as client identities.
    revoked_issuers: IssuerRevocations
    #: The expiry gauges of /metrics (computed at start, then stale while revalidated).
    expiry_gauges: ExpiryCollector | None = None
    #: Threads of /healthz, apart from the worker threads: a burst that occupies every
    #: worker thread cannot make the health check wait.
    probe_threads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="certfleet-probe")
    )
    #: The feed's high-water mark in the data folder (None: not kept, e.g. a bare state).
    mark: FeedMark | None = None
    #: The console's fleet overview (:mod:`registry.stale_while_revalidate`), made by the
    #: console at its first fleet page.
    fleet_overview: StaleWhileRevalidate[Any] | None = None
    #: One read of the feed shared by the long-polls a publication wakes together.
    feed_reads: SharedReads[FeedKey, FeedAnswer] = field(default_factory=SharedReads)

    def close(self) -> None:
        """Stop what the state started (long-poll waiters, verify workers)."""
        self.feed.close()
        self.crl.close()
        self.verifier.close()
        self.planner.join(30)
        self.probe_threads.shutdown(wait=False, cancel_futures=True)
