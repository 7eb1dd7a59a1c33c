"""Retained messages cluster-wide, stored in JetStream.

One stream (:data:`RETAINED_STREAM`, subjects under
:data:`~broker.cluster.subjects.RETAINED_PREFIX`) keeps the last message of each subject
(``max_msgs_per_subject`` 1); an empty payload clears a topic, as in MQTT. A node publishes a
retained message its client sent (after the publish ACL, and never for a renewal topic:
:meth:`broker.amqtt_adapter.CertfleetBroker.retain_message` refuses those before anything is
stored), follows the other nodes' ones live, and on every NATS connection loads the last
message of every subject into the broker's retained store (its
:class:`~broker.broker_port.BrokerPort`). Delivery then stays amqtt's path with our receive
check (:mod:`broker.amqtt_adapter`): a client gets a retained message only for a filter
it holds and only if the ACL lets it receive the topic.
"""

from __future__ import annotations

import contextlib
import logging

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType

from broker.broker_port import BrokerPort
from broker.cluster.link import ClusterLink, NotConnectedError, ensure_stream
from broker.cluster.router import NODE_HEADER, QOS_HEADER
from broker.cluster.subjects import RETAINED_PREFIX, subject_of_topic, topic_of_subject

__all__ = ["RETAINED_STREAM", "RetainedSync"]

log = logging.getLogger(__name__)

RETAINED_STREAM = "CERTFLEET_RETAINED"
_LOAD_IDLE_S = 0.5


class RetainedSync:
    """Keeps one node's retained messages equal to the cluster's."""

    def __init__(self, link: ClusterLink, broker: BrokerPort) -> None:
        self.link = link
        self.broker = broker
        self.node = link.options.node
        link.add_setup(self._setup)
        link.require_streams(RETAINED_STREAM)

    async def _setup(self, client: NatsClient, js: JetStreamContext) -> None:
        await ensure_stream(
            js,
            name=RETAINED_STREAM,
            subjects=[RETAINED_PREFIX + ".>"],
            max_msgs_per_subject=1,
            storage=StorageType.FILE,
        )
        await client.subscribe(RETAINED_PREFIX + ".>", cb=self._apply)
        loader = await js.subscribe(
            RETAINED_PREFIX + ".>",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        try:
            while True:
                try:
                    message = await loader.next_msg(timeout=_LOAD_IDLE_S)
                except nats.errors.TimeoutError:
                    break
                await self._apply(message)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await loader.unsubscribe()

    async def _apply(self, msg: Msg) -> None:
        try:
            topic = topic_of_subject(msg.subject, RETAINED_PREFIX)
        except ValueError:
            return
        qos = int((msg.headers or {}).get(QOS_HEADER, "0")) if msg.data else 0
        self.broker.put_retained(topic, msg.data, qos)

    async def publish(self, topic: str, data: bytes, qos: int | None) -> None:
        """Store a local client's retained message (empty ``data``: clear the topic)."""
        headers = {NODE_HEADER: self.node, QOS_HEADER: str(qos or 0)}
        try:
            await self.link.js.publish(
                subject_of_topic(topic, RETAINED_PREFIX), data, stream=RETAINED_STREAM,
                headers=headers,
            )  # fmt: skip
        except (nats.errors.Error, OSError, TimeoutError, NotConnectedError) as exc:
            log.warning(
                "retained message kept on this node only topic=%r error=%s",
                topic[:200],
                f"{exc!r}"[:200],
            )
