"""Routing between nodes: what one node admits, every node's subscribers get, once.

Choice (docs/cluster.md, "Routing"): **deliver locally directly, and publish to NATS for the
other nodes**. A PUBLISH that passed the publisher's ACL is routed by the local amqtt
broadcast as on a single node (no NATS round trip for local subscribers, and local
delivery keeps working while NATS is down) and published once on its subject
(:mod:`broker.cluster.subjects`). Every node holds one NATS subscription on the whole MQTT
subject space, on a connection opened with ``no_echo``: NATS never hands a node its own
publishes back, and each other node gets exactly one copy, which it injects into its own
broadcast, where the RECEIVE check runs for each local subscriber as today. So a
subscription sees a message once: from the local broadcast if the publisher is on its
node, from NATS otherwise, never both.

Headers carry the origin node (logs, tests) and, for a will, the QoS it forces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker.cluster.link import ClusterLink
from broker.cluster.subjects import SUBJECT_PREFIX, subject_of_topic, topic_of_subject

__all__ = ["ClusterRouter", "NODE_HEADER", "QOS_HEADER"]

log = logging.getLogger(__name__)

NODE_HEADER = "Certfleet-Node"
QOS_HEADER = "Certfleet-Qos"

#: Delivers a message from another node into the local broadcast: (topic, payload, qos).
Deliver = Callable[[str, bytes, int | None], None]


class ClusterRouter:
    """Forwards local publishes to NATS and delivers the other nodes' ones locally."""

    def __init__(
        self,
        link: ClusterLink,
        deliver: Deliver,
        *,
        on_forwarded: Callable[[], None] = lambda: None,
        on_not_forwarded: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self.node = link.options.node
        self._deliver = deliver
        self._on_forwarded = on_forwarded
        self._on_not_forwarded = on_not_forwarded
        link.add_setup(self._subscribe)

    async def _subscribe(self, client: NatsClient, _js: JetStreamContext) -> None:
        await client.subscribe(SUBJECT_PREFIX + ".>", cb=self._on_message)

    async def _on_message(self, msg: Msg) -> None:
        try:
            topic = topic_of_subject(msg.subject)
        except ValueError as exc:
            log.warning("cluster message dropped subject=%r error=%s", msg.subject[:200], exc)
            return
        headers = msg.headers or {}
        if headers.get(NODE_HEADER) == self.node:
            return  # belt and braces: no_echo already keeps our own publishes away
        forced = headers.get(QOS_HEADER)
        self._deliver(topic, msg.data, int(forced) if forced is not None else None)

    async def forward(self, topic: str, data: bytes, force_qos: int | None) -> bool:
        """Publish a locally admitted message for the other nodes; False when NATS is down
        (the local subscribers have it anyway)."""
        if not self.link.connected:
            self._on_not_forwarded()
            return False
        headers = {NODE_HEADER: self.node}
        if force_qos is not None:
            headers[QOS_HEADER] = str(force_qos)
        await self.link.client.publish(subject_of_topic(topic), data, headers=headers)
        self._on_forwarded()
        return True
