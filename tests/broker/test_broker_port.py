"""The broker side of the cluster seam (broker/broker_port.py), on a real ClusterBroker
(amqtt's own state, no NATS needed): what the cluster reads and writes through the port lands
in amqtt's own state, and a session away from the node is never taken for a live one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker.acl import TopicAcl
from broker.amqtt_cluster_routing import ClusterBroker
from broker.auth import AdmissionPolicy
from broker.broker_port import BrokerPort
from broker.gate import ConnectGate
from broker.metrics import BrokerMetrics
from fleetcore.topics import TELEMETRY_FILTER, telemetry_topic
from tests.support.pki import TRUST_DOMAIN

T = TypeVar("T")


class _NothingRevoked:
    def is_serial_revoked(self, serial: str) -> bool:
        return False

    def is_device_decommissioned(self, device_id: str) -> bool:
        return False


def _with_broker(run: Callable[[ClusterBroker], Awaitable[T]]) -> T:
    """``run`` on a ClusterBroker built on a running loop and not started (no listener and
    no broadcast loop: the state the port reads and writes is amqtt's all the same)."""

    async def main() -> T:
        gate = ConnectGate(AdmissionPolicy(TRUST_DOMAIN, _NothingRevoked()), BrokerMetrics())
        return await run(ClusterBroker(gate=gate, acl=TopicAcl(TRUST_DOMAIN)))

    return asyncio.run(main())


def test_put_retained_sets_and_clears_amqtt_s_retained_message() -> None:
    topic = telemetry_topic("dev-r1")

    async def run(broker: ClusterBroker) -> tuple[bytes, int, bool]:
        port: BrokerPort = broker
        port.put_retained(topic, b"21.5", 1)
        stored = broker.retained_messages[topic]
        port.put_retained(topic, b"", 0)
        return bytes(stored.data), stored.qos, topic in broker.retained_messages

    assert _with_broker(run) == (b"21.5", 1, False)


def test_an_away_persistent_session_is_offered_with_its_filters_but_never_as_live() -> None:
    async def run(broker: ClusterBroker) -> dict[str, object]:
        handler, session = broker.create_offline_session("service:monitor")
        session.clean_session = False
        broker.sessions["service:monitor"] = (session, handler)
        granted = await broker.add_subscription((TELEMETRY_FILTER, 1), session)
        client = broker.client_of(session)
        before = client.filters()
        client.restore_filter(TELEMETRY_FILTER, 1)  # held already: not added twice
        client.restore_filter("devices/+/status", 0)
        return {
            "granted": granted,
            "key": client.key,
            "persistent": client.persistent,
            "connected": client.connected,
            "live": client.live,
            "before": before,
            "after": client.filters(),
            "subscribers": len(broker.subscriptions[TELEMETRY_FILTER]),
            "has": broker.has_subscribers(TELEMETRY_FILTER),
            "has_other": broker.has_subscribers("devices/+/cert/renew"),
            "connected_clients": broker.connected_clients(),
        }

    seen = _with_broker(run)
    assert seen["granted"] == 1
    assert (seen["key"], seen["persistent"], seen["connected"], seen["live"]) == (
        "service:monitor", True, False, False,
    )  # fmt: skip
    assert seen["before"] == {TELEMETRY_FILTER: 1}
    assert seen["after"] == {TELEMETRY_FILTER: 1, "devices/+/status": 0}
    assert seen["subscribers"] == 1
    assert (seen["has"], seen["has_other"]) == (True, False)
    assert seen["connected_clients"] == []


def test_deliver_remote_queues_the_message_for_one_local_filter() -> None:
    topic = telemetry_topic("dev-r2")

    async def queued(broker: ClusterBroker) -> object:
        broker.deliver_remote(topic, b"x", 1, TELEMETRY_FILTER, True)
        return broker._broadcast_queue.get_nowait()  # not started: nothing routes it away

    assert _with_broker(queued) == {
        "session": None,
        "topic": topic,
        "data": b"x",
        "filter": TELEMETRY_FILTER,
        "stored": True,
        "qos": 1,
    }
