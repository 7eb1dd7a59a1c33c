"""Routing between nodes: what one node admits, every node's subscribers get, once.

Choice (docs/cluster.md, "Routing"): **deliver locally directly, and publish to NATS for the
other nodes**. A PUBLISH that passed the publisher's ACL is routed by the local amqtt
broadcast as on a single node (no NATS round trip for local subscribers, and local
delivery keeps working while NATS is down) and published once on its subject
(:mod:`broker.cluster.subjects`), on a connection opened with ``no_echo``: NATS never hands
a node its own publishes back. A message stored in JetStream is published there, under the
message stream's subjects; any other under :data:`LIVE_PREFIX`, outside them, so JetStream
never keeps it (a persistent session's consumer would, and its client get it twice).

**Interest per filter.** A node subscribes on NATS to the subjects of each filter its local
clients hold, under both prefixes (one NATS subscription per subject, made before the SUBACK goes
out, dropped when the filter's last local subscriber leaves), so NATS sends a node only
what one of its clients wants, and a node with no subscribers receives nothing. Each NATS
subscription delivers into the local broadcast *for its own filter only*: two local
clients on overlapping filters (``a/#``, ``a/b``) each get the message once, exactly as on
a single node, where the RECEIVE check runs for each local subscriber as today.

Headers carry, when set, the QoS a will forces and whether the message was stored in
JetStream (:data:`STORED_HEADER`: persistent QoS 1 subscriptions get a stored message from
their consumer, any other live); a plain message carries none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from broker.cluster.link import ClusterLink
from broker.cluster.subjects import (
    LIVE_PREFIX,
    SUBJECT_PREFIX,
    filter_subjects,
    subject_of_topic,
    topic_of_subject,
)

__all__ = ["NODE_HEADER", "QOS_HEADER", "STORED_HEADER", "ClusterRouter"]

log = logging.getLogger(__name__)

#: A node receives, for each filter its clients hold, the messages stored in JetStream (the
#: message stream's subjects) and those routed live only (outside them).
_ROUTED_PREFIXES = (SUBJECT_PREFIX, LIVE_PREFIX)
_LIVE_HEAD = LIVE_PREFIX + "."

NODE_HEADER = "Certfleet-Node"
QOS_HEADER = "Certfleet-Qos"
STORED_HEADER = "Certfleet-Stored"

#: Delivers a message from another node into the local broadcast, for one local filter:
#: (topic, payload, forced qos, filter, stored in JetStream).
Deliver = Callable[[str, bytes, int | None, str, bool], None]


class ClusterRouter:
    """Forwards local publishes to NATS and delivers the other nodes' ones locally."""

    def __init__(
        self,
        link: ClusterLink,
        deliver: Deliver,
        *,
        on_forwarded: Callable[[], None] = lambda: None,
        on_not_forwarded: Callable[[], None] = lambda: None,
        on_received: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self.node = link.options.node
        self._deliver = deliver
        self._on_forwarded = on_forwarded
        self._on_not_forwarded = on_not_forwarded
        self._on_received = on_received
        self._wanted: set[str] = set()
        self._subscribed: dict[str, list[Subscription]] = {}
        link.add_setup(self._resubscribe)

    @property
    def filters(self) -> frozenset[str]:
        """The filters this node receives from the others (its local clients' filters)."""
        return frozenset(self._wanted)

    # -- interest -------------------------------------------------------------------------

    async def want(self, topic_filter: str) -> None:
        """Receive the other nodes' messages for ``topic_filter`` (a local client holds it);
        subscribed on NATS before it returns, when connected."""
        if topic_filter in self._wanted:
            return
        self._wanted.add(topic_filter)
        if self.link.connected:
            client = self.link.client
            await self._subscribe(client, topic_filter)
            await client.flush()  # NATS knows the interest before our SUBACK goes out

    async def unwant(self, topic_filter: str) -> None:
        """No local client holds ``topic_filter`` any more."""
        self._wanted.discard(topic_filter)
        await _unsubscribe(topic_filter, self._subscribed.pop(topic_filter, []))

    async def _resubscribe(self, client: NatsClient, _js: JetStreamContext) -> None:
        """A new connection has no subscriptions: make every wanted one again."""
        self._subscribed.clear()
        for topic_filter in list(self._wanted):
            await self._subscribe(client, topic_filter)

    async def _subscribe(self, client: NatsClient, topic_filter: str) -> None:
        if topic_filter in self._subscribed:
            return  # subscribed (or being subscribed) on this connection
        subscriptions = self._subscribed[topic_filter] = []

        async def on_message(msg: Msg) -> None:
            self._on_message(topic_filter, msg)

        for prefix in _ROUTED_PREFIXES:
            for subject in filter_subjects(topic_filter, prefix):
                subscriptions.append(await client.subscribe(subject, cb=on_message))
        if topic_filter not in self._wanted:  # let go while we subscribed
            if self._subscribed.get(topic_filter) is subscriptions:
                del self._subscribed[topic_filter]
            await _unsubscribe(topic_filter, subscriptions)

    def _on_message(self, topic_filter: str, msg: Msg) -> None:
        self._on_received()
        live = msg.subject.startswith(_LIVE_HEAD)
        try:
            topic = topic_of_subject(msg.subject, LIVE_PREFIX if live else SUBJECT_PREFIX)
        except ValueError as exc:
            log.warning("cluster message dropped subject=%r error=%s", msg.subject[:200], exc)
            return
        headers = msg.headers
        if not headers:
            self._deliver(topic, msg.data, None, topic_filter, False)
            return
        if headers.get(NODE_HEADER) == self.node:
            return  # belt and braces: no_echo already keeps our own publishes away
        forced = headers.get(QOS_HEADER)
        stored = not live and headers.get(STORED_HEADER) == "1"
        self._deliver(
            topic, msg.data, int(forced) if forced is not None else None, topic_filter, stored
        )

    # -- publishing -----------------------------------------------------------------------

    async def forward(self, topic: str, data: bytes, force_qos: int | None) -> bool:
        """Publish a locally admitted message for the other nodes, not stored; False when
        NATS is down (the local subscribers have it anyway)."""
        if not self.link.connected:
            self._on_not_forwarded()
            return False
        headers = {QOS_HEADER: str(force_qos)} if force_qos is not None else None
        await self.link.client.publish(subject_of_topic(topic, LIVE_PREFIX), data, headers=headers)
        self._on_forwarded()
        return True


async def _unsubscribe(topic_filter: str, subscriptions: list[Subscription]) -> None:
    for subscription in list(subscriptions):
        try:
            await subscription.unsubscribe()
        except Exception as exc:  # noqa: BLE001 - a closed connection took it already
            log.debug("cluster unsubscribe failed filter=%r error=%r", topic_filter, exc)
