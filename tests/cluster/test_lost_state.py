"""Faults the cluster must report or repair (issue 22, item 9): nats-server frozen (a stall
the connection does not show), the session bucket or the message stream deleted from
outside."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import pytest

from broker.cluster.durable import SESSIONS_BUCKET, STREAM
from broker.cluster.natsd import LocalNats
from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from fleetcore.topics import TELEMETRY_FILTER, telemetry_topic
from tests.broker.conftest import MqttProbe, connect, issue_device, wait_for
from tests.cluster.conftest import StartNode, wait_set_up
from tests.conftest import TestPKI
from tests.support.nats import admin_connect
from tests.support.pki import ClientFiles

#: The bound for seeing a stall: the default stall_s (1.5 s) plus a probe interval.
_STALL_SEEN_S = 3.0


def _health(node: BrokerServer) -> tuple[int, str]:
    assert node.metrics_url is not None
    url = node.metrics_url.removesuffix("/metrics") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _connected_gauge(node: BrokerServer) -> float:
    value: float = node.metrics.cluster_connected._value.get()
    return value


def test_a_frozen_nats_server_is_reported_within_seconds_and_recovers(
    start_node: StartNode, nats_server: LocalNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.cluster.link")
    nodes = [start_node("a"), start_node("b")]
    wait_set_up(*nodes)
    assert all(_health(node)[0] == 200 for node in nodes)
    assert nats_server.process is not None
    pid = nats_server.process.pid
    os.kill(pid, signal.SIGSTOP)  # the connections stay open; nothing answers
    frozen = time.monotonic()
    try:
        for node in nodes:
            assert wait_for(lambda n=node: _health(n)[0] == 503, _STALL_SEEN_S), _health(node)
        assert time.monotonic() - frozen < _STALL_SEEN_S + 0.5
        for node in nodes:
            status, body = _health(node)
            assert status == 503 and "has not answered" in body, body
            assert _connected_gauge(node) == 0
            assert node.metrics.cluster_stalls._value.get() == 1
        time.sleep(max(0.0, 8.0 - (time.monotonic() - frozen)))
        for node in nodes:  # still reported for the whole freeze
            assert _health(node)[0] == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    for node in nodes:
        assert wait_for(lambda n=node: _health(n)[0] == 200, 5), _health(node)
        assert _connected_gauge(node) == 1
    logged = [r.getMessage() for r in caplog.records]
    assert sum("cluster link stalled" in m for m in logged) == 2
    # Cleared by NATS answering again, or by a new connection if nats-py's own pings gave
    # the frozen one up meanwhile (on a loaded machine).
    cleared = ("cluster link answers again", "cluster link up")
    assert sum(any(c in m for c in cleared) for m in logged) >= 4  # 2 connects + 2 clearings


def _delete(nats_server: LocalNats, stream: str) -> None:
    async def run() -> None:
        client = await admin_connect(nats_server)
        try:
            await client.jetstream().delete_stream(stream)
        finally:
            await client.close()

    asyncio.run(run())


def _max_msg_size(nats_server: LocalNats, stream: str, *, remake_closed: bool = False) -> int:
    """The stream's ``max_msg_size``; with ``remake_closed``, first deleted and made again at
    once with 1 (a store fits no more), as a node that made it again and died before opening
    it leaves it."""

    async def run() -> int:
        client = await admin_connect(nats_server)
        try:
            js = client.jetstream()
            if remake_closed:
                config = (await js.stream_info(stream)).config
                config.max_msg_size = 1
                await js.delete_stream(stream)
                await js.add_stream(config)
            return int((await js.stream_info(stream)).config.max_msg_size or -1)
        finally:
            await client.close()

    return asyncio.run(run())


def _exists(nats_server: LocalNats, stream: str) -> bool:
    async def run() -> bool:
        client = await admin_connect(nats_server)
        try:
            await client.jetstream().stream_info(stream)
            return True
        except nats.js.errors.NotFoundError:
            return False
        finally:
            await client.close()

    return asyncio.run(run())


def _persistent_subscriber(node: BrokerServer, identity: ClientFiles) -> MqttProbe:
    """The service ``monitor``, connected to ``node`` with a persistent session holding a
    QoS 1 telemetry subscription."""
    subscriber = connect(node.port, identity, "monitor", clean_session=False)
    assert subscriber.connected.is_set(), subscriber.reason
    subscriber.client.subscribe(TELEMETRY_FILTER, qos=1)
    assert subscriber.subscribed.wait(5) and subscriber.suback == [1]
    return subscriber


def _publish(device: MqttProbe, device_id: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        info = device.client.publish(telemetry_topic(device_id), payload, qos=1)
        info.wait_for_publish(15)
        assert info.is_published(), payload


@pytest.mark.parametrize("lost", ["sessions bucket", "message stream"])
def test_a_deleted_bucket_or_stream_is_made_again_and_persistent_sessions_work(
    lost: str,
    pki: TestPKI,
    start_node: StartNode,
    nats_server: LocalNats,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Deleted from outside while a persistent subscriber is connected: the nodes see it
    within seconds, make it again (logged, counted) with the connected session written
    into it; what is acknowledged afterwards reaches the subscriber, connected and after a
    reconnect elsewhere, and a new persistent subscription is granted."""
    stream = f"KV_{SESSIONS_BUCKET}" if lost == "sessions bucket" else STREAM
    node_a, node_b = start_node("a"), start_node("b")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    subscriber = _persistent_subscriber(node_a, monitor)
    device = connect(node_b.port, issue_device(pki, tmp_path, "dev-lost"), "dev-lost")
    assert device.connected.is_set(), device.reason
    try:
        _publish(device, "dev-lost", [b"before"])
        assert wait_for(lambda: (telemetry_topic("dev-lost"), b"before") in subscriber.messages)
        _delete(nats_server, stream)
        deleted = time.monotonic()
        assert wait_for(lambda: _exists(nats_server, stream), 6), f"{stream} not made again"
        assert time.monotonic() - deleted < 6
        nodes = (node_a, node_b)
        assert wait_for(
            lambda: sum(n.metrics.cluster_streams_missing._value.get() for n in nodes) >= 1, 5
        )
        assert wait_for(lambda: all(_health(n)[0] == 200 for n in nodes), 10)
        live = [f"live{i}".encode() for i in range(10)]
        _publish(device, "dev-lost", live)
        got = lambda: {p for _t, p in subscriber.messages}  # noqa: E731
        assert wait_for(lambda: set(live) <= got(), 10), sorted(set(live) - got())[:3]
        subscriber.close()
        offline = [f"off{i}".encode() for i in range(10)]
        _publish(device, "dev-lost", offline)
        resumed = connect(node_b.port, monitor, "monitor", clean_session=False)
        try:
            assert resumed.connected.is_set(), resumed.reason
            assert resumed.session_present
            again = lambda: {p for _t, p in resumed.messages}  # noqa: E731
            assert wait_for(lambda: set(offline) <= again(), 10), sorted(set(offline) - again())
        finally:
            resumed.close()
        other = connect(node_a.port, pki.client(IdentityKind.SERVICE, "auditor"), "auditor",
                        clean_session=False)  # fmt: skip
        try:
            other.client.subscribe(TELEMETRY_FILTER, qos=1)
            assert other.subscribed.wait(5) and other.suback == [1]
        finally:
            other.close()
    finally:
        device.close()
        subscriber.close()
    assert any("streams missing or made again" in r.getMessage() for r in caplog.records)
    # Set up again once per node (or twice, seeing the other's re-creation), not in a loop.
    losses = [r for r in caplog.records if "cluster link lost" in r.getMessage()]
    assert len(losses) <= 6, f"{len(losses)} reconnections after one deletion"


@pytest.mark.parametrize("maker", ["the publisher's node", "a node that died"])
def test_a_message_stream_made_again_elsewhere_takes_no_store_before_the_sessions_consumers(
    maker: str,
    pki: TestPKI,
    start_node: StartNode,
    nats_server: LocalNats,
    tmp_path: Path,
) -> None:
    """The stream made again by the publisher's node while the subscriber's node has not
    noticed yet (its watchdog slowed to ~40 s): interest retention would acknowledge and drop
    a store no consumer wants, so the maker puts every recorded session's consumers in
    before the stream takes a message. A stream left closed by a maker that died is opened
    by a node that notices it. Every acknowledged message reaches the subscriber."""
    node_a = start_node("a", broker_cluster_stall_s=30.0)  # checks its streams every 40 s
    node_b = start_node("b")
    wait_set_up(node_a, node_b)
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    subscriber = _persistent_subscriber(node_a, monitor)
    device = connect(node_b.port, issue_device(pki, tmp_path, "dev-made"), "dev-made")
    assert device.connected.is_set(), device.reason
    got = lambda: {p for _t, p in subscriber.messages}  # noqa: E731
    try:
        _publish(device, "dev-made", [b"before"])
        assert wait_for(lambda: b"before" in got())
        assert _max_msg_size(nats_server, STREAM) == -1  # open
        if maker == "a node that died":  # made again closed, and left so
            assert _max_msg_size(nats_server, STREAM, remake_closed=True) == 1
        else:
            _delete(nats_server, STREAM)
            assert wait_for(lambda: _exists(nats_server, STREAM), 6), "not made again"
        assert wait_for(lambda: node_b.metrics.cluster_streams_missing._value.get() >= 1, 5)
        assert node_a.metrics.cluster_streams_missing._value.get() == 0  # not noticed there
        live = [f"live{i}".encode() for i in range(10)]
        _publish(device, "dev-made", live)  # each PUBACKed only once stored
        assert wait_for(lambda: set(live) <= got(), 10), sorted(set(live) - got())[:3]
        assert _max_msg_size(nats_server, STREAM) == -1  # open again
        assert node_a.metrics.cluster_streams_missing._value.get() == 0
    finally:
        device.close()
        subscriber.close()
