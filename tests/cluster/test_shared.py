"""Shared subscriptions across two real nodes on a real nats-server: one delivery per
message per group, a member on the publisher's node preferred (no NATS traffic), NATS
queue groups otherwise, and a leaving member's unacknowledged messages taken by a member
on the other node."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from broker.cluster.natsd import LocalNats
from broker.cluster.shared import SHARED_PREFIX, decode_batch, encode_batch
from broker.server import BrokerServer
from broker.shared_subscriptions import ShareFilter
from fleetcore.profile import IdentityKind
from fleetcore.topics import telemetry_topic
from tests.broker.conftest import MqttProbe, connect, issue_device, wait_for
from tests.cluster.conftest import StartNode
from tests.conftest import TestPKI
from tests.support.mqtt import payloads, subscribed

FILTER = "devices/+/telemetry"
SHARE = ShareFilter("ingest", FILTER)


class RawNats:
    """A plain NATS subscriber on the shared-subscription subjects, counting messages."""

    def __init__(self, server: LocalNats) -> None:
        self.server = server
        self.count = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = self._run(self._connect())

    def _run(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)  # type: ignore[arg-type]

    async def _connect(self) -> object:
        creds = self.server.credentials
        client = await nats.connect(self.server.url, user=creds.user, password=creds.password)

        async def seen(_msg: object) -> None:
            self.count += 1

        await client.subscribe(f"{SHARED_PREFIX}.>", cb=seen)
        await client.flush()
        return client

    def close(self) -> None:
        self._run(self._client.close())  # type: ignore[attr-defined]
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def raw_nats(nats_server: LocalNats) -> Iterator[RawNats]:
    raw = RawNats(nats_server)
    yield raw
    raw.close()


def _member(node: BrokerServer, pki: TestPKI, client_id: str, **kw: bool) -> MqttProbe:
    probe = connect(node.port, pki.client(IdentityKind.SERVICE, "registry"), client_id, **kw)
    return subscribed(probe, f"$share/{SHARE.group}/{FILTER}")


def _knows_the_other(*nodes: BrokerServer) -> bool:
    def knows(node: BrokerServer) -> bool:
        shared = node.app.cluster.shared if node.app and node.app.cluster else None
        return shared is not None and shared.elsewhere(SHARE)

    return all(knows(node) for node in nodes)


def _publish(device: MqttProbe, device_id: str, count: int) -> list[bytes]:
    sent = [f"{device_id}-{i}".encode() for i in range(count)]
    for payload in sent:
        device.client.publish(telemetry_topic(device_id), payload, qos=1).wait_for_publish(5)
    return sent


def _remote_sent(node: BrokerServer) -> float:
    return node.metrics.registry.get_sample_value("certfleet_broker_shared_remote_total") or 0


def test_one_delivery_per_message_across_two_nodes_and_the_local_member_first(
    pki: TestPKI, start_node: StartNode, raw_nats: RawNats, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    member_a, member_b = _member(node_a, pki, "registry/a"), _member(node_b, pki, "registry/b")
    dev_a = connect(node_a.port, issue_device(pki, tmp_path, "dev-a"), "dev-a")
    dev_b = connect(node_b.port, issue_device(pki, tmp_path, "dev-b"), "dev-b")
    try:
        assert wait_for(lambda: _knows_the_other(node_a, node_b))
        sent_a, sent_b = _publish(dev_a, "dev-a", 30), _publish(dev_b, "dev-b", 30)
        assert wait_for(lambda: len(payloads(member_a, member_b)) >= 60)
        time.sleep(0.3)  # a duplicate would arrive by now
        assert sorted(payloads(member_a, member_b)) == sorted(sent_a + sent_b)
        # Each node's member took its own node's publishers: nothing crossed NATS.
        assert sorted(payloads(member_a)) == sorted(sent_a)
        assert sorted(payloads(member_b)) == sorted(sent_b)
        assert raw_nats.count == 0
        assert _remote_sent(node_a) == 0 and _remote_sent(node_b) == 0
    finally:
        for probe in (member_a, member_b, dev_a, dev_b):
            probe.close()


def test_a_group_with_members_on_another_node_only_is_served_through_nats_once(
    pki: TestPKI, start_node: StartNode, raw_nats: RawNats, tmp_path: Path
) -> None:
    node_a, node_b, node_c = start_node("a"), start_node("b"), start_node("c")
    member_b, member_c = _member(node_b, pki, "registry/b"), _member(node_c, pki, "registry/c")
    dev = connect(node_a.port, issue_device(pki, tmp_path, "dev-a"), "dev-a")
    try:
        assert wait_for(lambda: _knows_the_other(node_a, node_b, node_c))
        sent = _publish(dev, "dev-a", 40)
        assert wait_for(lambda: len(payloads(member_b, member_c)) >= 40)
        time.sleep(0.3)
        assert sorted(payloads(member_b, member_c)) == sorted(sent)  # each once
        assert member_b.messages and member_c.messages  # NATS's queue group spreads them
        assert raw_nats.count == 40 and _remote_sent(node_a) == 40
    finally:
        for probe in (member_b, member_c, dev):
            probe.close()


def test_without_local_preference_messages_go_to_the_other_node(
    pki: TestPKI, start_node: StartNode, raw_nats: RawNats, tmp_path: Path
) -> None:
    node_a = start_node("a", broker_shared_prefer_local=False)
    node_b = start_node("b", broker_shared_prefer_local=False)
    member_a, member_b = _member(node_a, pki, "registry/a"), _member(node_b, pki, "registry/b")
    dev = connect(node_a.port, issue_device(pki, tmp_path, "dev-a"), "dev-a")
    try:
        assert wait_for(lambda: _knows_the_other(node_a, node_b))
        sent = _publish(dev, "dev-a", 20)
        assert wait_for(lambda: len(payloads(member_a, member_b)) >= 20)
        time.sleep(0.3)
        assert sorted(payloads(member_a, member_b)) == sorted(sent)
        assert sorted(payloads(member_b)) == sorted(sent)  # all crossed NATS
        assert raw_nats.count == 20
    finally:
        for probe in (member_a, member_b, dev):
            probe.close()


def _silent_member_leaves(
    node_a: BrokerServer,
    node_b: BrokerServer,
    silent: MqttProbe,
    member_b: MqttProbe,
    dev: MqttProbe,
) -> float:
    """``dev`` (on ``node_a``) publishes 20 readings; ``silent`` (on ``node_a``, acknowledging
    none) takes them all (local preference) and vanishes; ``member_b`` (on ``node_b``) gets
    each once. Returns the seconds from the drop until ``member_b`` had them all."""
    assert wait_for(lambda: _knows_the_other(node_a, node_b))
    sent = _publish(dev, "dev-a", 20)
    assert wait_for(lambda: len(silent.messages) >= 20, 3)
    assert member_b.messages == []  # local preference: all went to the silent member
    left_at = time.monotonic()
    silent.drop()
    assert wait_for(lambda: len(set(payloads(member_b))) >= 20, 4)
    took = time.monotonic() - left_at
    assert sorted(set(payloads(member_b))) == sorted(sent)  # nothing lost
    assert max(Counter(payloads(member_b)).values()) == 1
    return took


def test_a_leaving_member_s_unacknowledged_messages_go_to_the_other_node_s_member(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    # The member on the publisher's node takes every message and acknowledges none.
    silent = _member(node_a, pki, "registry/a", manual_ack=True)
    member_b = _member(node_b, pki, "registry/b")
    dev = connect(node_a.port, issue_device(pki, tmp_path, "dev-a"), "dev-a")
    try:
        _silent_member_leaves(node_a, node_b, silent, member_b, dev)
        handed = node_a.metrics.registry.get_sample_value(
            "certfleet_broker_shared_handed_over_total"
        )
        assert handed == 20
    finally:
        for probe in (member_b, dev):
            probe.close()


def test_a_persistent_member_s_unacknowledged_messages_go_to_the_other_node_s_member(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    # A persistent member (clean session off) on the publisher's node takes every message
    # and acknowledges none; it vanishes, and the member on the other node gets them all.
    silent = _member(node_a, pki, "registry/a", clean_session=False, manual_ack=True)
    member_b = _member(node_b, pki, "registry/b")
    dev = connect(node_a.port, issue_device(pki, tmp_path, "dev-a"), "dev-a")
    try:
        took = _silent_member_leaves(node_a, node_b, silent, member_b, dev)
        assert took < 4  # at the disconnect, not amqtt's 5 s timeout
    finally:
        for probe in (member_b, dev):
            probe.close()


def test_a_batch_of_shared_messages_decodes_to_what_was_encoded() -> None:
    records = [
        ("devices/dev-a/telemetry", b'{"t": 1}', None, 0),
        ("devices/dév-b/telemetry", b"", 1, 3),  # a non-ASCII level, an empty payload
        ("devices/dev-c/telemetry", bytes(range(256)) * 40, 0, 7),
    ]
    assert decode_batch(encode_batch(records)) == records
    assert decode_batch(b"") == []
    whole = encode_batch(records)
    for cut in (1, 8, len(whole) - 1):  # a torn batch is refused, not half delivered
        with pytest.raises(ValueError):
            decode_batch(whole[:cut])
