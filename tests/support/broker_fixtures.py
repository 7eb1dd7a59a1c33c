"""Fixtures several test folders use, defined once: a conftest makes them visible to its
folder by importing them (``from tests.support.broker_fixtures import broker``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.server import BrokerServer
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.support.pki import TestPKI
from tests.support.servers import broker_data_dir, broker_settings, operator_client
from tests.support.sqlite import migrated_sqlite_url

__all__ = ["broker", "operator", "registry"]


@pytest.fixture
def broker(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerServer]:
    """Our broker on 127.0.0.1:0 with the session CA, following no registry."""
    layout = broker_data_dir(pki, tmp_path / "broker-data")
    with BrokerServer(broker_settings(layout)) as server:
        yield server


@pytest.fixture
def registry(pki: TestPKI, tmp_path: Path) -> Iterator[RegistryServer]:
    """A registry on SQLite (a copy of the migrated template) with a fast revocation feed."""
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=migrated_sqlite_url(tmp_path / "registry.db"),
        registry_feed_poll_seconds=0.2,
        telemetry_broker_addr=None,
    )
    with RegistryServer(settings) as server:
        yield server


@pytest.fixture
def operator(pki: TestPKI, registry: RegistryServer) -> Iterator[httpx.Client]:
    """Operator alice's mTLS REST client of ``registry``."""
    with operator_client(pki, registry.url) as client:
        yield client
