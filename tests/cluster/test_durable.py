"""Durable sessions: a persistent session's QoS 1 messages live in JetStream, so the client
resumes on any node and gets everything acknowledged to its publishers, once."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import pytest

from broker.cluster.durable import OWNERS_BUCKET, SESSIONS_BUCKET
from broker.cluster.natsd import LocalNats
from broker.server import BrokerServer
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from fleetcore.topics import TELEMETRY_FILTER, telemetry_topic
from tests.cluster.conftest import StartNode, node_settings, wait_set_up
from tests.support.mqtt import MqttProbe, connect
from tests.support.nats import admin_connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for


def test_persistent_session_resumes_on_the_other_node_with_every_acknowledged_message(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    first = connect(node_b.port, monitor, "monitor", clean_session=False)
    assert first.connected.is_set(), first.reason
    first.client.subscribe(TELEMETRY_FILTER, qos=1)
    assert first.subscribed.wait(5) and first.suback == [1]
    first.close()

    device = connect(node_a.port, issue_device(pki, tmp_path, "dev-d1"), "dev-d1")
    assert device.connected.is_set(), device.reason
    try:
        for index in range(30):
            info = device.client.publish(telemetry_topic("dev-d1"), f"q{index}".encode(), qos=1)
            info.wait_for_publish(10)  # PUBACK: stored in JetStream
            assert info.is_published()
    finally:
        device.close()

    resumed = connect(node_a.port, monitor, "monitor", clean_session=False)
    try:
        assert resumed.connected.is_set(), resumed.reason
        assert resumed.session_present  # made on node b, known on node a
        assert wait_for(lambda: len(resumed.messages) >= 30, 15), len(resumed.messages)
        time.sleep(0.5)  # a duplicate would arrive within this
        # Every acknowledged message, once (a message handed back by the node the client
        # left may come after later ones: MQTT's redelivery does not keep the order).
        assert sorted(resumed.messages) == sorted(
            (telemetry_topic("dev-d1"), f"q{i}".encode()) for i in range(30)
        )
    finally:
        resumed.close()


def _subscriber_and_two_devices(
    pki: TestPKI,
    tmp_path: Path,
    node_a: BrokerServer,
    node_b: BrokerServer,
    local: str,
    remote: str,
) -> tuple[MqttProbe, MqttProbe, MqttProbe]:
    """The service ``monitor``'s persistent QoS 1 telemetry subscription on node a, device
    ``local`` on node a and ``remote`` on node b, all connected (closed if not)."""
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    probes = (
        connect(node_a.port, monitor, "monitor", clean_session=False),
        connect(node_a.port, issue_device(pki, tmp_path, local), local),
        connect(node_b.port, issue_device(pki, tmp_path, remote), remote),
    )
    try:
        assert all(probe.connected.is_set() for probe in probes), [p.reason for p in probes]
        probes[0].client.subscribe(TELEMETRY_FILTER, qos=1)
        assert probes[0].subscribed.wait(5) and probes[0].suback == [1]
    except BaseException:
        for probe in probes:
            probe.close()
        raise
    return probes


def test_live_persistent_subscriber_gets_each_message_once(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """Connected, a persistent session's QoS 1 subscription is served from JetStream only,
    whether the publisher is on its node or the other one."""
    node_a, node_b = start_node("a"), start_node("b")
    subscriber, local, remote = _subscriber_and_two_devices(
        pki, tmp_path, node_a, node_b, "dev-l", "dev-m"
    )
    try:
        for index in range(10):
            local.client.publish(telemetry_topic("dev-l"), f"l{index}".encode(), qos=1)
            remote.client.publish(telemetry_topic("dev-m"), f"m{index}".encode(), qos=1)
        assert wait_for(lambda: len(subscriber.messages) >= 20, 15), len(subscriber.messages)
        time.sleep(0.5)
        assert sorted(subscriber.messages) == sorted(
            [(telemetry_topic("dev-l"), f"l{i}".encode()) for i in range(10)]
            + [(telemetry_topic("dev-m"), f"m{i}".encode()) for i in range(10)]
        )
    finally:
        for probe in (subscriber, local, remote):
            probe.close()


def test_a_message_routed_live_reaches_a_persistent_subscriber_once_and_is_not_kept(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """QoS 0 messages (routed live, never stored), from the subscriber's node and from the
    other: a connected persistent QoS 1 subscription gets each once (the message stream used
    to keep a live message its consumer matched, so it came twice), and none is kept for
    the session while it is offline; the QoS 1 messages of that time are."""
    node_a, node_b = start_node("a"), start_node("b")
    wait_set_up(node_a, node_b)
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    subscriber, local, remote = _subscriber_and_two_devices(
        pki, tmp_path, node_a, node_b, "dev-z", "dev-y"
    )
    try:
        sent = []
        for index in range(10):
            for probe, device in ((local, "dev-z"), (remote, "dev-y")):
                payload = f"{device}-{index}".encode()
                probe.client.publish(telemetry_topic(device), payload, qos=0)
                sent.append((telemetry_topic(device), payload))
        assert wait_for(lambda: len(subscriber.messages) >= 20, 10), len(subscriber.messages)
        time.sleep(1.0)  # a second copy, from the stream, would arrive within this
        assert sorted(subscriber.messages) == sorted(sent)
        subscriber.close()
        for probe, device in ((local, "dev-z"), (remote, "dev-y")):
            probe.client.publish(telemetry_topic(device), b"offline-qos0", qos=0)
            kept = probe.client.publish(telemetry_topic(device), b"offline-qos1", qos=1)
            kept.wait_for_publish(10)
            assert kept.is_published()
        resumed = connect(node_b.port, monitor, "monitor", clean_session=False)
        try:
            assert resumed.connected.is_set() and resumed.session_present
            assert wait_for(lambda: len(resumed.messages) >= 2, 10), resumed.messages
            time.sleep(0.5)
            assert sorted(p for _t, p in resumed.messages) == [b"offline-qos1"] * 2
        finally:
            resumed.close()
    finally:
        for probe in (subscriber, local, remote):
            probe.close()


def test_a_message_delivered_but_not_acknowledged_when_the_client_leaves_is_handed_back_at_once(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """A persistent subscriber leaves with a stored message sent to it but not PUBACKed:
    the node hands it back at once, so the session resumed on the other node gets it well
    before JetStream's ack wait (10 s) would redeliver it."""
    node_a, node_b = start_node("a"), start_node("b")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    holder = connect(node_a.port, monitor, "monitor", clean_session=False, manual_ack=True)
    device = connect(node_b.port, issue_device(pki, tmp_path, "dev-h"), "dev-h")
    try:
        assert holder.connected.is_set() and device.connected.is_set()
        holder.client.subscribe(TELEMETRY_FILTER, qos=1)
        assert holder.subscribed.wait(5) and holder.suback == [1]
        info = device.client.publish(telemetry_topic("dev-h"), b"held", qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        assert wait_for(lambda: (telemetry_topic("dev-h"), b"held") in holder.messages, 10)
    finally:
        holder.close()  # leaves without the PUBACK
        device.close()
    left = time.monotonic()
    resumed = connect(node_b.port, monitor, "monitor", clean_session=False)
    try:
        assert resumed.connected.is_set(), resumed.reason
        assert wait_for(lambda: (telemetry_topic("dev-h"), b"held") in resumed.messages, 8)
        assert time.monotonic() - left < 4, "redelivered only after the ack wait"
    finally:
        resumed.close()


def test_clean_session_discards_the_stored_session(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    first = connect(node_a.port, monitor, "monitor", clean_session=False)
    first.client.subscribe(TELEMETRY_FILTER, qos=1)
    assert first.subscribed.wait(5)
    first.close()
    clean = connect(node_b.port, monitor, "monitor", clean_session=True)
    assert clean.connected.is_set(), clean.reason
    time.sleep(0.5)  # the node drops the stored session in the background
    clean.close()
    device = connect(node_a.port, issue_device(pki, tmp_path, "dev-c"), "dev-c")
    device.client.publish(telemetry_topic("dev-c"), b"after", qos=1).wait_for_publish(10)
    device.close()
    again = connect(node_a.port, monitor, "monitor", clean_session=False)
    try:
        time.sleep(1.0)
        assert again.messages == []
    finally:
        again.close()


@pytest.mark.alone
def test_a_session_gone_longer_than_the_expiry_is_forgotten_everywhere(
    pki: TestPKI, start_node: StartNode, tmp_path: Path
) -> None:
    """A connected persistent session's record is kept (rewritten) past the expiry; once its
    client has been away longer than the expiry, the record ages out of the bucket, every
    node stops storing for it, and a reconnect finds no session (session present 0)."""
    expiry = 6
    node_a = start_node("a", broker_session_expiry_s=expiry)
    node_b = start_node("b", broker_session_expiry_s=expiry)
    assert node_a.app is not None and node_a.app.cluster is not None
    durable = node_a.app.cluster.durable
    assert durable is not None
    topic = telemetry_topic("dev-x1")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    subscriber = connect(node_b.port, monitor, "monitor", clean_session=False)
    assert subscriber.connected.is_set(), subscriber.reason
    subscriber.client.subscribe(TELEMETRY_FILTER, qos=1)
    assert subscriber.subscribed.wait(5)
    assert wait_for(lambda: durable.interest.needs_store(topic), 5)
    time.sleep(expiry * 1.5)  # connected all along: its record is rewritten, not expired
    assert durable.interest.needs_store(topic)
    subscriber.close()
    assert wait_for(lambda: not durable.interest.needs_store(topic), expiry * 4)
    again = connect(node_a.port, monitor, "monitor", clean_session=False)
    try:
        assert again.connected.is_set(), again.reason
        assert not again.session_present
    finally:
        again.close()


def test_buckets_made_without_an_expiry_get_the_nodes_expiry(
    start_node: StartNode, nats_server: LocalNats
) -> None:
    """Buckets a node of an older version made (no TTL: their records never aged out) are
    brought to the session expiry when a node starts; a later expiry setting moves it."""

    async def bucket_ttls(create: bool) -> dict[str, float | None]:
        client = await admin_connect(nats_server)
        try:
            js = client.jetstream()
            ttls: dict[str, float | None] = {}
            for name in (SESSIONS_BUCKET, OWNERS_BUCKET):
                if create:  # as round 3's nodes made them
                    await js.create_key_value(bucket=name, history=1)
                ttls[name] = (await (await js.key_value(name)).status()).ttl
            return ttls
        finally:
            await client.close()

    assert not any(asyncio.run(bucket_ttls(create=True)).values())  # 0: records never age out
    # A node sets its buckets up once its NATS link is up, which may be after it listens.
    node = start_node("a", broker_session_expiry_s=90)
    expect = {SESSIONS_BUCKET: 90, OWNERS_BUCKET: 90}
    assert wait_for(lambda: asyncio.run(bucket_ttls(create=False)) == expect, 10)
    node.stop()
    start_node("b", broker_session_expiry_s=600)
    expect = {SESSIONS_BUCKET: 600, OWNERS_BUCKET: 600}
    assert wait_for(lambda: asyncio.run(bucket_ttls(create=False)) == expect, 10, poll=0.1)


def test_nodes_stopped_while_they_set_up_their_connection_leave_no_task_behind(
    cluster_layout: DataLayout, nats_server: LocalNats, caplog: pytest.LogCaptureFixture
) -> None:
    """A node stopped as soon as it reaches NATS, while its connection's setup (stream,
    buckets, watchers) is still running: nothing it started outlives its event loop (a
    watcher task started after the close was destroyed pending, and failed a later test)."""
    for attempt in range(6):
        server = BrokerServer(node_settings(cluster_layout, nats_server, f"n{attempt}"))  # type: ignore[arg-type]
        server.start()
        try:
            cluster = server.app.cluster if server.app is not None else None
            assert cluster is not None
            assert wait_for(lambda: cluster.link.connected, 10)  # noqa: B023 - called here
        finally:
            server.stop()
    gc.collect()
    destroyed = [r for r in caplog.records if "Task was destroyed" in r.getMessage()]
    assert destroyed == []
