"""What one running registry app holds: settings, engine, CA, feed notifier, CRL, metrics."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine

from factory.ca import CertificateAuthority
from registry.crl import CrlCache
from registry.feed import FeedNotifier
from registry.metrics import RegistryMetrics
from registry.settings import RegistrySettings

__all__ = ["VERIFY_WORKERS", "RegistryState"]

#: Threads checking a batch's certificate signatures (OpenSSL releases the GIL meanwhile).
VERIFY_WORKERS = min(4, os.cpu_count() or 1)


@dataclass
class RegistryState:
    settings: RegistrySettings
    engine: Engine
    ca: CertificateAuthority
    feed: FeedNotifier
    crl: CrlCache
    metrics: RegistryMetrics
    #: Checks certificate signatures of a batch in parallel (OpenSSL releases the GIL).
    verify_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            max_workers=VERIFY_WORKERS, thread_name_prefix="registry-verify"
        )
    )
