"""Cluster fixtures: a real nats-server and broker nodes joined to it (in this process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.cluster.natsd import LocalNats
from broker.server import BrokerServer
from fleetcore.layout import DataLayout
from tests.support.broker_fixtures import operator, registry
from tests.support.nats import nats_server
from tests.support.pki import TestPKI
from tests.support.servers import broker_settings, feed_broker_layout
from tests.support.waits import wait_for

__all__ = ["nats_server", "operator", "registry", "wait_set_up"]

StartNode = Callable[..., BrokerServer]


def node_settings(layout: DataLayout, nats: LocalNats, node: str, **overrides: object) -> object:
    values: dict[str, object] = {
        "broker_node": node,
        "broker_cluster_url": nats.url,
        "broker_cluster_user": nats.credentials.user,
        "broker_cluster_password": nats.credentials.password,
        "broker_cluster_max_backoff_s": 0.5,
    }
    values.update(overrides)
    return broker_settings(layout, **values)


@pytest.fixture
def cluster_layout(pki: TestPKI, tmp_path: Path) -> DataLayout:
    """One data folder shared by every node (state files are named by node), with the
    broker's service certificate for the revocation feed."""
    return feed_broker_layout(pki, tmp_path / "broker-data")


@pytest.fixture
def start_node(cluster_layout: DataLayout, nats_server: LocalNats) -> Iterator[StartNode]:
    """Start a broker node joined to the test's nats-server; all stopped at teardown."""
    started: list[BrokerServer] = []

    def start(node: str, **overrides: object) -> BrokerServer:
        server = BrokerServer(node_settings(cluster_layout, nats_server, node, **overrides))  # type: ignore[arg-type]
        server.start()
        started.append(server)
        app = server.app
        assert app is not None and app.cluster is not None
        assert wait_for(lambda: app.cluster is not None and app.cluster.link.connected, 10)
        return server

    yield start
    for server in reversed(started):
        server.stop()


def wait_set_up(*nodes: BrokerServer) -> None:
    """Wait until each node is set up (streams, buckets, watchers), not only connected."""
    for node in nodes:
        link = node.app.cluster.link if node.app and node.app.cluster else None
        assert link is not None and wait_for(lambda k=link: k.reconnects >= 1, 10)
