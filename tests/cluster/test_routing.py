"""Routing between nodes: a message admitted on one node reaches every matching subscriber
on every node, exactly once; the ACL still applies at both ends."""

from __future__ import annotations

import time
from pathlib import Path

from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from fleetcore.topics import TELEMETRY_FILTER, issued_topic, telemetry_topic
from tests.cluster.conftest import StartNode
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for


def test_telemetry_published_on_one_node_reaches_subscribers_on_both_once(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """Live routing: no persistent subscription wants telemetry, so nothing is stored in
    JetStream (each PUBACK goes at once), and a node none of whose clients holds a matching
    filter is sent nothing by NATS."""
    node_a, node_b, idle = start_node("a"), start_node("b"), start_node("idle")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    remote = connect(node_b.port, monitor, "monitor/b")
    local = connect(node_a.port, monitor, "monitor/a")
    for probe in (remote, local):
        assert probe.connected.is_set(), probe.reason
        probe.client.subscribe(TELEMETRY_FILTER, qos=1)
        assert probe.subscribed.wait(5)
    device = connect(node_a.port, issue_device(pki, tmp_path, "dev-r1"), "dev-r1")
    assert device.connected.is_set(), device.reason
    try:
        for index in range(20):
            device.client.publish(telemetry_topic("dev-r1"), f"m{index}".encode(), qos=1)
        assert wait_for(lambda: len(remote.messages) >= 20 and len(local.messages) >= 20)
        time.sleep(0.3)  # a duplicate would arrive within this
        expected = [(telemetry_topic("dev-r1"), f"m{i}".encode()) for i in range(20)]
        assert remote.messages == expected
        assert local.messages == expected
        sample = node_a.metrics.registry.get_sample_value
        assert sample("certfleet_broker_cluster_stored_total") == 0
        assert sample("certfleet_broker_cluster_forwarded_total") == 20
        assert (
            node_b.metrics.registry.get_sample_value("certfleet_broker_cluster_received_total")
            == 20
        )
        assert (
            idle.metrics.registry.get_sample_value("certfleet_broker_cluster_received_total") == 0
        )
    finally:
        for probe in (device, remote, local):
            probe.close()


def test_receive_acl_applies_at_the_subscribers_node(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """The registry answers a renewal on node A; only the device it is for, on node B,
    receives it, and a device subscribed on B to its own topics does not get another's."""
    node_a, node_b = start_node("a"), start_node("b")
    registry = connect(node_a.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    target = connect(node_b.port, issue_device(pki, tmp_path, "dev-t"), "dev-t")
    other = connect(node_b.port, issue_device(pki, tmp_path, "dev-o"), "dev-o")
    try:
        for probe in (target, other):
            assert probe.connected.is_set(), probe.reason
            probe.client.subscribe(f"devices/{probe.client._client_id.decode()}/#", qos=1)
            assert probe.subscribed.wait(5)
        assert registry.connected.is_set(), registry.reason
        registry.client.publish(issued_topic("dev-t"), b"certificate", qos=1)
        assert wait_for(lambda: target.messages == [(issued_topic("dev-t"), b"certificate")])
        time.sleep(0.3)
        assert other.messages == []
    finally:
        for probe in (registry, target, other):
            probe.close()


def test_a_publish_refused_at_the_publishers_node_reaches_no_node(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    victim = connect(node_b.port, issue_device(pki, tmp_path, "dev-v"), "dev-v")
    attacker = connect(node_a.port, issue_device(pki, tmp_path, "dev-x"), "dev-x")
    try:
        assert victim.connected.is_set() and attacker.connected.is_set()
        victim.client.subscribe("devices/dev-v/#", qos=1)
        assert victim.subscribed.wait(5)
        attacker.client.publish(issued_topic("dev-v"), b"forged", qos=1).wait_for_publish(5)
        assert wait_for(lambda: node_a.metrics.acl_refusal_count("publish") >= 1)
        time.sleep(0.3)
        assert victim.messages == []
        assert (
            node_a.metrics.registry.get_sample_value("certfleet_broker_cluster_stored_total") == 0
        )
    finally:
        victim.close()
        attacker.close()


def test_overlapping_filters_on_the_remote_node_each_get_a_message_once(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """Node b holds two filters that both match; NATS sends b the message once per filter,
    and each subscriber gets it once, as on a single node."""
    node_a, node_b = start_node("a"), start_node("b")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    wide = connect(node_b.port, monitor, "monitor/wide")
    narrow = connect(node_b.port, monitor, "monitor/narrow")
    for probe, topic_filter in ((wide, TELEMETRY_FILTER), (narrow, telemetry_topic("dev-o1"))):
        assert probe.connected.is_set(), probe.reason
        probe.client.subscribe(topic_filter, qos=1)
        assert probe.subscribed.wait(5)
    device = connect(node_a.port, issue_device(pki, tmp_path, "dev-o1"), "dev-o1")
    assert device.connected.is_set(), device.reason
    try:
        for index in range(10):
            device.client.publish(telemetry_topic("dev-o1"), f"m{index}".encode(), qos=1)
        assert wait_for(lambda: len(wide.messages) >= 10 and len(narrow.messages) >= 10)
        time.sleep(0.3)  # a duplicate would arrive within this
        expected = [(telemetry_topic("dev-o1"), f"m{i}".encode()) for i in range(10)]
        assert wide.messages == expected
        assert narrow.messages == expected
    finally:
        for probe in (device, wide, narrow):
            probe.close()


def test_a_node_whose_last_subscriber_left_is_sent_nothing_more(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """The NATS interest goes with the filter's last local subscriber (unsubscribe or
    disconnect): afterwards NATS sends the node nothing for it."""
    node_a, node_b = start_node("a"), start_node("b")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    leaving = connect(node_b.port, monitor, "monitor/leaving")
    staying = connect(node_b.port, monitor, "monitor/staying")
    for probe, topic_filter in ((leaving, TELEMETRY_FILTER), (staying, telemetry_topic("x"))):
        assert probe.connected.is_set(), probe.reason
        probe.client.subscribe(topic_filter, qos=1)
        assert probe.subscribed.wait(5)
    device = connect(node_a.port, issue_device(pki, tmp_path, "dev-l1"), "dev-l1")
    assert device.connected.is_set(), device.reason
    received = lambda: node_b.metrics.registry.get_sample_value(  # noqa: E731
        "certfleet_broker_cluster_received_total"
    )
    try:
        device.client.publish(telemetry_topic("dev-l1"), b"before", qos=1)
        assert wait_for(lambda: len(leaving.messages) == 1)
        assert received() == 1
        leaving.close()  # node b's only client on the telemetry filter
        assert wait_for(lambda: TELEMETRY_FILTER not in router_filters(node_b), 5)
        for index in range(5):
            device.client.publish(telemetry_topic("dev-l1"), f"after{index}".encode(), qos=1)
        time.sleep(0.5)
        assert received() == 1  # nothing more came to node b
        assert staying.messages == []
    finally:
        for probe in (device, staying):
            probe.close()


def router_filters(node: BrokerServer) -> frozenset[str]:
    """The filters a node receives from the others (its router's interest)."""
    app = node.app
    assert app is not None and app.cluster is not None and app.cluster.router is not None
    return app.cluster.router.filters
