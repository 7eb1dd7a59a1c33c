"""The seam between the broker (amqtt, adapted) and its cluster side (:mod:`broker.cluster`).

Two small interfaces, one each way, so that neither side holds the other's concrete class:

- :class:`BrokerPort` and :class:`LocalClient`: what the cluster asks of the broker (which
  clients are connected here, deliver to one, its filters, restore one, put a retained
  message, route another node's message). Implemented by
  :class:`broker.amqtt_cluster_routing.ClusterBroker`, the only place that knows how amqtt
  keeps sessions, subscriptions, handlers and retained messages.
- :class:`ClusterHooks`: what the broker tells the cluster on its message paths.
  Implemented by :class:`broker.cluster.durable.DurableSessions`.

Nothing here imports amqtt: a session crosses the seam as a :class:`LocalClient`, plain
values otherwise (docs/cluster.md, "The broker seam").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from broker.shared_subscriptions import SharedSubscriptions

__all__ = ["BrokerPort", "ClusterHooks", "LocalClient", "ShareRetained"]

#: Hands a retained message a local client set (empty payload: cleared) to the cluster.
ShareRetained = Callable[[str, bytes, int | None], Awaitable[None]]


class LocalClient(Protocol):
    """A client's session on this node, bound to the connection that carried it when the
    broker handed it over (or to none: a session whose client is away)."""

    @property
    def key(self) -> str | None:
        """The session key (the MQTT client id)."""

    @property
    def persistent(self) -> bool:
        """Clean session off: the session outlives its connection."""

    @property
    def connected(self) -> bool:
        """A connection of this session is up (this one or a newer one)."""

    @property
    def attached(self) -> bool:
        """This connection still carries the session (its client may have left)."""

    @property
    def live(self) -> bool:
        """This connection still carries the session and is up."""

    def current(self) -> LocalClient | None:
        """The same session bound to the connection that carries it now; None when it has
        none."""

    def filters(self) -> dict[str, int]:
        """The session's filters on this node, with their QoS."""

    def restore_filter(self, topic_filter: str, qos: int) -> None:
        """Give the session ``topic_filter`` back (resumed from the cluster's record),
        unless a session of its key holds it already. No SUBACK, no retained replay."""

    def may_receive(self, topic: str) -> bool:
        """Whether the ACL lets this client receive ``topic``."""

    async def deliver(self, topic: str, data: bytes, qos: int) -> None:
        """Send a message on this connection (retain flag off); returns once a QoS 1
        message is acknowledged. Raises ``asyncio.CancelledError`` when the connection
        ends while the acknowledgement is awaited, another error when it cannot be sent."""


class ClusterHooks(Protocol):
    """What a cluster node (:mod:`broker.cluster`) adds to the broker's message paths."""

    def needs_store(self, topic: str) -> bool:
        """Whether a QoS 1 message on ``topic`` must be stored before its PUBACK."""

    async def forward(
        self,
        topic: str,
        data: bytes,
        force_qos: int | None,
        stored: asyncio.Future[bool] | None,
        durable: bool,
    ) -> None:
        """A local client's admitted message, stored first when ``durable``; a QoS 1 one
        resolves ``stored`` once its PUBACK may go."""

    def served_from_store(self, persistent: bool, sub_qos: int) -> bool:
        """Whether a subscription (of a ``persistent`` session, granted ``sub_qos``) gets
        its messages from the cluster's store only."""

    async def subscribed(self, client: LocalClient, topic_filter: str, qos: int) -> bool:
        """A subscription was granted; False refuses it (SUBACK 0x80). ``client`` is bound
        to the session's connection at the time of the call."""

    def unsubscribed(self, client: LocalClient, topic_filter: str) -> None:
        """A subscription was removed."""

    def session_started(self, client: LocalClient) -> None:
        """A client's session is connected on this node (``client`` bound to it)."""

    async def stored_session(self, session_key: str) -> bool:
        """Whether the cluster holds a persistent session for ``session_key``."""


class BrokerPort(Protocol):
    """What the cluster side of a node reaches of its broker."""

    @property
    def shared(self) -> SharedSubscriptions:
        """This node's shared subscriptions (their cluster side plugs in as ``remote``)."""

    def use_cluster(self, hooks: ClusterHooks) -> None:
        """Run as a cluster node: the broker calls ``hooks`` on its message paths."""

    def share_retained_with(self, share: ShareRetained) -> None:
        """Hand every retained message a local client sets (or clears) to ``share``."""

    def connected_clients(self) -> list[LocalClient]:
        """Every session whose client is connected here, bound to its connection."""

    def has_subscribers(self, topic_filter: str) -> bool:
        """Whether a session on this node holds ``topic_filter``."""

    def put_retained(self, topic: str, data: bytes, qos: int) -> None:
        """Set the retained message of ``topic`` (empty ``data``: clear it), as the
        cluster's store has it; not shared again."""

    def deliver_remote(
        self, topic: str, data: bytes, force_qos: int | None, topic_filter: str, stored: bool
    ) -> None:
        """Route a message another node admitted to this node's subscribers of
        ``topic_filter``; ``stored``: it is in the cluster's store too."""
