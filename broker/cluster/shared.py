"""Shared subscriptions across the cluster: a group is cluster-wide, one member gets each
message, a member on the publisher's node first.

Choice (docs/cluster.md, "Shared subscriptions"):

- **Which nodes hold which groups**: each node with a member of a group writes
  ``<group token>.<node token>`` to the KV bucket :data:`GROUPS_BUCKET` (the group and
  filter as JSON), rewrites it every :data:`REFRESH_S` and deletes it when its last member
  leaves; every node watches the bucket. An entry not rewritten for :data:`STALE_S` (a
  node that died) no longer counts.
- **Local preference** (default): a local publisher's message for a group with a connected
  member on this node is delivered here, with no NATS traffic. Otherwise, when another node
  holds the group, it is published on ``certfleet.shared.<group token>.batch``; every node
  with members subscribes to ``certfleet.shared.<group token>.>`` in the NATS queue group
  ``<group token>``, so NATS hands it to exactly one of them. **Batched**: what one
  event-loop turn sends to a group goes out as one NATS message (records of topic, payload,
  forced QoS and hand-over count, :func:`encode_batch`), so the NATS publish, its parse on
  the receiving node and the subscription's callback are paid once per batch, not per
  message (the scale-out benchmark's profile, issue 24); a batch goes to one node. The
  link's ``no_echo`` keeps it from coming back to the publishing node. Switched off
  (``--no-shared-prefer-local``), a message goes to another node's member whenever there
  is one (the benchmark's comparison).
- **Hand-over**: a member that leaves with unacknowledged QoS 1 messages hands them to
  another member here, else to another node through the same subject (each record counts
  its hand-overs, at most :data:`~broker.shared_subscriptions.MAX_HANDOVERS`). A batch NATS
  refuses is delivered here instead (or queued, or counted lost, as with no member).
- **Persistent sessions**: a shared subscription is live state of the node its client is
  connected to. It is not in the cluster's session record nor served from JetStream (a
  group has other members to take the messages); a client that reconnects to another node
  subscribes again, as it does at every connect.

Core NATS is at most once: a message in flight to a node that dies is lost (as a plain
subscription's live message); a member's unacknowledged messages are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from broker.cluster.link import ClusterLink, NotConnectedError
from broker.shared_subscriptions import (
    MAX_HANDOVERS,
    SharedGroup,
    SharedSubscriptions,
    ShareFilter,
)
from fleetcore.topics import topic_matches

__all__ = [
    "GROUPS_BUCKET",
    "MAX_BATCH_BYTES",
    "SHARED_PREFIX",
    "ClusterShared",
    "decode_batch",
    "encode_batch",
    "share_token",
]

log = logging.getLogger(__name__)

SHARED_PREFIX = "certfleet.shared"
GROUPS_BUCKET = "certfleet_shared_groups"
#: A batch's NATS payload stays under this (nats-server's default max_payload is 1 MiB).
MAX_BATCH_BYTES = 512 * 1024
#: One record's head: topic length, payload length, forced QoS (-1: none), hand-overs.
_RECORD = struct.Struct(">HIbB")
#: (topic, payload, forced qos, hand-overs) of one message in a batch.
Record = tuple[str, bytes, int | None, int]
#: How often a node rewrites its groups' entries, and when an entry counts as stale.
REFRESH_S = 10.0
STALE_S = 35.0
_ERRORS = (nats.errors.Error, OSError, TimeoutError, NotConnectedError)
_DELETES = ("DEL", "PURGE")


@functools.lru_cache(maxsize=4096)
def share_token(share: ShareFilter) -> str:
    """The NATS token (subject level, queue group, KV key part) of a group of a filter
    (cached: it is needed for every message sent to another node)."""
    return hashlib.sha256(f"{share.group}\0{share.topic_filter}".encode()).hexdigest()[:20]


def encode_batch(records: list[Record]) -> bytes:
    """One NATS payload holding ``records``, in order."""
    parts: list[bytes] = []
    for topic, data, qos, hops in records:
        name = topic.encode()
        parts.append(_RECORD.pack(len(name), len(data), -1 if qos is None else qos, hops))
        parts.append(name)
        parts.append(data)
    return b"".join(parts)


def decode_batch(payload: bytes) -> list[Record]:
    """The records of a payload from :func:`encode_batch`; ValueError if malformed."""
    records: list[Record] = []
    head, size, pos = _RECORD.size, len(payload), 0
    while pos < size:
        if pos + head > size:
            raise ValueError(f"shared batch truncated at byte {pos}")
        topic_len, data_len, qos, hops = _RECORD.unpack_from(payload, pos)
        pos += head
        end = pos + topic_len + data_len
        if end > size or qos > 1:
            raise ValueError(f"shared batch record at byte {pos - head} is malformed")
        topic = payload[pos : pos + topic_len].decode()
        records.append((topic, payload[pos + topic_len : end], None if qos < 0 else qos, hops))
        pos = end
    return records


def _chunks(records: list[Record]) -> list[list[Record]]:
    """``records`` cut into runs of at most :data:`MAX_BATCH_BYTES` each (a bigger single
    message alone)."""
    chunks: list[list[Record]] = [[]]
    size = 0
    for record in records:
        length = _RECORD.size + len(record[0]) * 4 + len(record[1])
        if chunks[-1] and size + length > MAX_BATCH_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(record)
        size += length
    return chunks


def _node_token(node: str) -> str:
    return hashlib.sha256(node.encode()).hexdigest()[:12]


class ClusterShared:
    """The cluster side of one node's shared subscriptions (a
    :class:`~broker.shared_subscriptions.RemoteGroups`)."""

    def __init__(
        self,
        link: ClusterLink,
        shared: SharedSubscriptions,
        *,
        prefer_local: bool = True,
        on_sent: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self.shared = shared
        self.prefer_local = prefer_local
        self._on_sent = on_sent
        self._me = _node_token(link.options.node)
        self._mine: set[ShareFilter] = set()
        self._subscriptions: dict[ShareFilter, Subscription] = {}
        #: group token -> (its share, {node token: when last seen})
        self._known: dict[str, tuple[ShareFilter, dict[str, float]]] = {}
        self._bucket: KeyValue | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        #: what this event-loop turn sends, per group, until :meth:`_flush` runs
        self._outbox: dict[ShareFilter, list[Record]] = {}
        self._flushing = False
        shared.remote = self
        link.add_setup(self._setup)

    # -- RemoteGroups ---------------------------------------------------------------------

    def serve_here(self, group: SharedGroup | None, share: ShareFilter) -> bool:
        if group is None or not group.any_connected():
            return False
        return self.prefer_local or not self.elsewhere(share)

    def remote_shares(self, topic: str) -> list[ShareFilter]:
        if not self._known:
            return []
        return [
            share
            for share, nodes in self._known.values()
            if share not in self.shared.groups
            and self._live_elsewhere(nodes)
            and topic_matches(topic, share.topic_filter)
        ]

    async def send(
        self, share: ShareFilter, topic: str, data: bytes, qos: int | None, hops: int
    ) -> bool:
        if hops >= MAX_HANDOVERS or not self.link.connected or not self.elsewhere(share):
            return False
        if self._closed:
            return False
        self._outbox.setdefault(share, []).append((topic, data, qos, hops))
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())  # runs on the loop's next turn: one batch per group
        self._on_sent()
        return True

    async def _flush(self) -> None:
        """Publish what was sent since the last flush, one NATS message per group (per
        :data:`MAX_BATCH_BYTES`); a batch NATS refuses is delivered on this node."""
        self._flushing = False
        outbox, self._outbox = self._outbox, {}
        for share, records in outbox.items():
            subject = f"{SHARED_PREFIX}.{share_token(share)}.batch"
            for chunk in _chunks(records):
                try:
                    await self.link.client.publish(subject, encode_batch(chunk))
                except _ERRORS as exc:
                    log.warning(
                        "shared batch not sent group=%s messages=%d error=%r (delivered here)",
                        share.group,
                        len(chunk),
                        exc,
                    )
                    for topic, data, qos, hops in chunk:
                        await self.shared.deliver(share, topic, data, qos, hops=hops, remote=False)

    def joined(self, share: ShareFilter) -> None:
        self._mine.add(share)
        self._spawn(self._announce(share))

    def left(self, share: ShareFilter) -> None:
        self._mine.discard(share)
        self._spawn(self._withdraw(share))

    # -- what the other nodes hold --------------------------------------------------------

    def _live_elsewhere(self, nodes: dict[str, float]) -> bool:
        cutoff = time.monotonic() - STALE_S
        return any(node != self._me and seen >= cutoff for node, seen in nodes.items())

    def elsewhere(self, share: ShareFilter) -> bool:
        """Whether another live node holds members of ``share``."""
        known = self._known.get(share_token(share))
        return known is not None and self._live_elsewhere(known[1])

    async def _setup(self, client: NatsClient, js: JetStreamContext) -> None:
        try:
            self._bucket = await js.key_value(GROUPS_BUCKET)
        except js_errors.BucketNotFoundError:
            self._bucket = await js.create_key_value(bucket=GROUPS_BUCKET, history=1, ttl=STALE_S)
        self._subscriptions.clear()  # a new connection has none
        for share in list(self._mine):
            await self._subscribe(client, share)
            await self._put(share)
        if self._watcher is not None:
            self._watcher.cancel()
        watcher = await self._bucket.watchall()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(watcher))

    async def _watch(self, watcher: Any) -> None:
        refresh = asyncio.get_running_loop().create_task(self._refresh())
        try:
            async for entry in watcher:
                if entry is None or entry.key is None:
                    continue
                self._apply(entry.key, entry.value, entry.operation)
        finally:
            refresh.cancel()
            with contextlib.suppress(*_ERRORS):
                await watcher.stop()

    def _apply(self, key: str, value: bytes | None, operation: str | None) -> None:
        token, _, node = key.partition(".")
        if operation in _DELETES or not value:
            known = self._known.get(token)
            if known is not None:
                known[1].pop(node, None)
                if not known[1]:
                    del self._known[token]
            return
        try:
            record = json.loads(value)
            share = ShareFilter(str(record["group"]), str(record["filter"]))
        except (ValueError, KeyError, TypeError):
            log.warning("shared group entry unreadable (ignored) key=%s", key[:80])
            return
        self._known.setdefault(token, (share, {}))[1][node] = time.monotonic()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            for share in list(self._mine):
                with contextlib.suppress(*_ERRORS):
                    await self._put(share)

    # -- this node's groups ---------------------------------------------------------------

    async def _put(self, share: ShareFilter) -> None:
        if self._bucket is None or not self.link.connected:
            return
        value = json.dumps({"group": share.group, "filter": share.topic_filter}).encode()
        await self._bucket.put(f"{share_token(share)}.{self._me}", value)

    async def _announce(self, share: ShareFilter) -> None:
        with contextlib.suppress(*_ERRORS):  # made again on the next connection
            client = self.link.client
            await self._subscribe(client, share)
            await self._put(share)
            await client.flush()

    async def _withdraw(self, share: ShareFilter) -> None:
        if share in self._mine:
            return  # joined again meanwhile
        subscription = self._subscriptions.pop(share, None)
        with contextlib.suppress(*_ERRORS):
            if subscription is not None:
                await subscription.unsubscribe()
            if self._bucket is not None and self.link.connected:
                await self._bucket.delete(f"{share_token(share)}.{self._me}")

    async def _subscribe(self, client: NatsClient, share: ShareFilter) -> None:
        if share in self._subscriptions:
            return
        token = share_token(share)

        async def on_message(msg: Msg) -> None:
            await self._on_message(share, msg)

        self._subscriptions[share] = await client.subscribe(
            f"{SHARED_PREFIX}.{token}.>", queue=token, cb=on_message
        )

    async def _on_message(self, share: ShareFilter, msg: Msg) -> None:
        try:
            records = decode_batch(msg.data)
        except ValueError as exc:
            log.warning("shared batch dropped subject=%r error=%s", msg.subject[:200], exc)
            return
        for topic, data, qos, hops in records:
            await self.shared.deliver(share, topic, data, qos, hops=hops + 1)

    # -- lifecycle ------------------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        if self._closed:
            coroutine.close()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop watching (the link closes the subscriptions with its connection)."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
