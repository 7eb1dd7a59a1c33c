"""One session per identity across nodes, and revocation enforced on every node."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from broker.auth import Refusal
from registry.server import RegistryServer
from tests.cluster.conftest import StartNode
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.servers import following_nodes, register
from tests.support.waits import wait_for


def test_connecting_on_another_node_takes_the_session_over(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    files = issue_device(pki, tmp_path, "dev-k")
    older = connect(node_a.port, files, "dev-k")
    assert older.connected.is_set(), older.reason
    time.sleep(0.3)  # node a records its ownership
    newer = connect(node_b.port, files, "dev-k")
    try:
        assert newer.connected.is_set(), newer.reason
        assert older.disconnected.wait(5), "the older connection on node a was not closed"
        time.sleep(0.5)
        assert not newer.disconnected.is_set(), newer.reason  # the newer one stays
    finally:
        older.close()
        newer.close()


@pytest.mark.alone
def test_decommission_drops_the_device_on_its_node_and_every_node_refuses_it(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    start_node: StartNode,
    tmp_path: Path,
) -> None:
    nodes = following_nodes(start_node, registry.url)
    files = issue_device(pki, tmp_path, "dev-rv")
    register(operator, files, "dev-rv")
    device = connect(nodes[1].port, files, "dev-rv")
    try:
        assert device.connected.is_set(), device.reason
        response = operator.post("/devices/dev-rv/decommission", json={"reason": "stolen"})
        assert response.status_code == 200, response.text
        decided = time.monotonic()
        assert device.disconnected.wait(5), "node b did not drop the revoked device"
        assert time.monotonic() - decided < 1.0
    finally:
        device.close()
    for node in nodes:
        before = node.metrics.refusal_count(Refusal.REVOKED.value)
        again = connect(node.port, files, "dev-rv")
        try:
            assert not again.connected.is_set()
            assert wait_for(lambda n=node, b=before: n.metrics.refusal_count("revoked") == b + 1)
        finally:
            again.close()
