"""Retained messages cluster-wide (JetStream), under the ACL; renewal topics never."""

from __future__ import annotations

import time
from pathlib import Path

from fleetcore.profile import IdentityKind
from fleetcore.topics import TELEMETRY_FILTER, renew_topic, telemetry_topic
from tests.cluster.conftest import StartNode
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for


def test_a_retained_message_set_on_one_node_is_served_by_every_node_under_the_acl(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    device = connect(node_a.port, issue_device(pki, tmp_path, "dev-ret"), "dev-ret")
    assert device.connected.is_set(), device.reason
    device.client.publish(telemetry_topic("dev-ret"), b"last", qos=1, retain=True).wait_for_publish(
        5
    )
    device.client.publish(renew_topic("dev-ret"), b"csr", qos=1, retain=True).wait_for_publish(5)
    device.close()
    time.sleep(0.3)
    node_c = start_node("c")  # joins later: loads the retained store from JetStream
    for node in (node_b, node_c):
        monitor = connect(node.port, pki.client(IdentityKind.SERVICE, "monitor"), "monitor")
        registry = connect(node.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
        other = connect(node.port, issue_device(pki, tmp_path, "dev-ot"), "dev-ot")
        try:
            monitor.client.subscribe(TELEMETRY_FILTER, qos=1)
            registry.client.subscribe("devices/+/cert/renew", qos=1)
            other.client.subscribe("devices/dev-ot/#", qos=1)
            assert wait_for(lambda m=monitor: len(m.received) >= 1)
            assert monitor.received == [(telemetry_topic("dev-ret"), b"last", 1, True)]
            time.sleep(0.3)
            assert registry.received == []  # renewal messages are never retained
            assert other.received == []
        finally:
            for probe in (monitor, registry, other):
                probe.close()


def test_an_empty_retained_message_clears_the_topic_on_every_node(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    files = issue_device(pki, tmp_path, "dev-clr")
    device = connect(node_a.port, files, "dev-clr")
    device.client.publish(telemetry_topic("dev-clr"), b"x", qos=1, retain=True).wait_for_publish(5)
    assert wait_for(
        lambda: (
            node_b.app is not None
            and node_b.app.broker is not None
            and telemetry_topic("dev-clr") in node_b.app.broker.retained_messages
        )
    )
    device.client.publish(telemetry_topic("dev-clr"), b"", qos=1, retain=True).wait_for_publish(5)
    device.close()
    assert wait_for(
        lambda: (
            node_b.app is not None
            and node_b.app.broker is not None
            and telemetry_topic("dev-clr") not in node_b.app.broker.retained_messages
        )
    )
