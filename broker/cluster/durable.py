"""Durable sessions in JetStream, and one session per identity cluster-wide.

- **One stream** (:data:`STREAM`) captures the whole MQTT subject space with *interest*
  retention: a message is kept only while a durable consumer that matches it has not
  acknowledged it, so nothing is stored for nobody.
- **A QoS 1 PUBLISH is acknowledged (PUBACK) once JetStream acknowledged the store**: the
  node publishes it with ``js.publish`` (which also reaches the other nodes' live
  subscription) and only then lets amqtt send the PUBACK. While NATS is unreachable the
  store is retried with backoff and the PUBACK withheld (backpressure, never a false ack);
  the local subscribers already have the message.
- **A persistent session** (clean session off) gets, for each QoS 1 subscription, a durable
  pull consumer on the stream (one per subject of its filter; nats-server 2.9 takes one
  filter subject per consumer), and a record of its filters in the KV bucket
  :data:`SESSIONS_BUCKET`. Its QoS 1 subscriptions are served *only* from those consumers
  (never by the live broadcast, so never twice), by whichever node the client is connected
  to: a node that gets the client re-creates its subscriptions from the record and pulls. A
  message is acknowledged to JetStream only after the client's PUBACK, so a node killed
  mid-delivery loses nothing (the message is redelivered, MQTT's at-least-once).
- **Ownership** (:data:`OWNERS_BUCKET`): each node writes a claim ``<node> <nonce>-<token>``
  under the session's key when a client's session starts there, and watches the bucket. The
  bucket's stream orders every claim (its revision); the connection whose claim a later
  revision overwrote is closed (the takeover MQTT asks for, across nodes), so exactly one
  connection per identity survives however the claims interleave. A claim is registered
  before its write is sent, so a later claim the watcher brings before our write returns is
  still weighed; it belongs to one connection, so a claim left by a connection that ended
  never closes a newer one (issue 22).

- **A stream or bucket deleted from outside** and made again (the link's watchdog sets the
  node up again, :mod:`broker.cluster.link`): the node writes the persistent sessions
  connected to it into it again (records, consumers, claims); what the deleted one held is
  lost (docs/faults.md). The message stream is made closed and opened only once every
  recorded session's consumers are in it (:meth:`DurableSessions._open_stream`).

KV keys are the SHA-256 of the session key (session keys hold ``:`` and ``/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.api import AckPolicy, DeliverPolicy, RetentionPolicy, StorageType
from nats.js.kv import KeyValue

from broker.broker_port import BrokerPort, LocalClient
from broker.cluster.link import ClusterLink, NotConnectedError
from broker.cluster.pull import ConsumerPull
from broker.cluster.router import QOS_HEADER, STORED_HEADER, ClusterRouter
from broker.cluster.store_interest import StoreInterest
from broker.cluster.store_pipeline import StorePipeline
from broker.cluster.subjects import (
    SUBJECT_PREFIX,
    filter_subjects,
    subject_of_topic,
    topic_of_subject,
)

__all__ = ["OWNERS_BUCKET", "SESSIONS_BUCKET", "STREAM", "DurableSessions", "storage_key"]

log = logging.getLogger(__name__)

STREAM = "CERTFLEET_MQTT"
SESSIONS_BUCKET = "certfleet_sessions"
OWNERS_BUCKET = "certfleet_owners"
#: Offline persistent sessions are kept this long by default (amqtt's session expiry, the
#: same hour; CERTFLEET_BROKER_SESSION_EXPIRY_S).
SESSION_EXPIRY_S = 3600.0
#: Stored messages asked for at a time, and how long a pull request waits at the server.
_FETCH_BATCH = 128
_FETCH_WAIT_S = 1.0
#: Stored messages sent to one client and not yet acknowledged by it (MQTT's in-flight
#: window): the next fetch does not wait for the previous batch's PUBACKs.
_DELIVERY_WINDOW = 512
#: How long a CONNECT waits to learn whether the cluster holds its session.
_LOOKUP_S = 1.0
_ACK_WAIT_S = 10.0
_ERRORS = (nats.errors.Error, OSError, TimeoutError, NotConnectedError)
#: The message stream's ``max_msg_size`` while it is closed (:meth:`DurableSessions._open_stream`):
#: every store carries a ``Nats-Msg-Id`` header, so none fits.
_CLOSED_MAX_MSG_SIZE = 1
#: How long reading every session record may take when the stream is made again.
_RECORDS_READ_S = 10.0

CloseConnection = Callable[[str], bool]


def _kv_stream(bucket: str) -> str:
    """The JetStream stream that holds a key-value bucket."""
    return f"KV_{bucket}"


def storage_key(session_key: str) -> str:
    """KV key and consumer-name stem of a session key."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


def _consumer_name(session_key: str, subject: str) -> str:
    return f"s{storage_key(session_key)[:20]}-{hashlib.sha256(subject.encode()).hexdigest()[:12]}"


async def _open_bucket(js: JetStreamContext, name: str, ttl_s: float) -> KeyValue:
    """The key-value bucket ``name`` whose records age out after ``ttl_s`` (a connected
    session's are rewritten): created so, or an existing one brought to it, such as one made
    by a node of a version without session expiry (no TTL) or with another expiry."""
    try:
        bucket = await js.key_value(name)
    except js_errors.BucketNotFoundError:
        return await js.create_key_value(bucket=name, history=1, ttl=ttl_s)
    status = await bucket.status()
    if status.ttl is None or abs(status.ttl - ttl_s) > 0.5:
        config = status.stream_info.config
        window = min(config.duplicate_window or ttl_s, ttl_s)
        await js.update_stream(config, max_age=ttl_s, duplicate_window=window)
        log.info("cluster bucket expiry set bucket=%s ttl_s=%g was=%s", name, ttl_s, status.ttl)
    return bucket


async def _recorded_sessions(bucket: KeyValue) -> dict[str, dict[str, int]]:
    """Every persistent session recorded in the sessions bucket: its key and its filters."""
    sessions: dict[str, dict[str, int]] = {}
    watcher: Any = await bucket.watchall()
    try:
        async with asyncio.timeout(_RECORDS_READ_S):
            async for entry in watcher:
                if entry is None:  # the bucket's current contents have all been delivered
                    break
                if entry.key is None or not entry.value or entry.operation in ("DEL", "PURGE"):
                    continue
                try:
                    record = json.loads(entry.value)
                    filters = {str(f): int(q) for f, q in record.get("filters", {}).items()}
                    sessions[str(record["key"])] = filters
                except (ValueError, TypeError, KeyError, AttributeError):
                    log.warning("session record unreadable (ignored) size=%d", len(entry.value))
    finally:
        with contextlib.suppress(*_ERRORS):
            await watcher.stop()
    return sessions


@dataclass(slots=True, eq=False)
class _Claim:
    """This node's claim on a session key for one connection (:meth:`DurableSessions._claim`)."""

    token: str
    session_key: str
    client: LocalClient
    #: Its revision in the owners bucket; 0 while the write is in flight.
    revision: int = 0
    #: The highest revision of another claim seen while ours was in flight, and its node.
    newer: int = 0
    newer_owner: str = ""


class DurableSessions:
    """The cluster hooks of one node (:class:`broker.broker_port.ClusterHooks`); it reaches
    the broker through its :class:`~broker.broker_port.BrokerPort` only."""

    def __init__(
        self,
        link: ClusterLink,
        router: ClusterRouter,
        broker: BrokerPort,
        *,
        close_connection: CloseConnection,
        on_stored: Callable[[], None] = lambda: None,
        on_store_retry: Callable[[], None] = lambda: None,
        session_expiry_s: float = SESSION_EXPIRY_S,
    ) -> None:
        self.link = link
        self.session_expiry_s = session_expiry_s
        self.router = router
        self.broker = broker
        self.node = link.options.node
        self._close_connection = close_connection
        self._on_stored = on_stored
        self._on_store_retry = on_store_retry
        self._nonce = secrets.token_hex(4)
        self._claims: dict[str, _Claim] = {}  # by storage key: this node's latest claim
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._sessions_kv: KeyValue | None = None
        self._owners_kv: KeyValue | None = None
        self._kv_watcher: Any = None
        self.interest = StoreInterest(forget_after_s=session_expiry_s)
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self.store = StorePipeline(link, on_stored=on_stored, on_retry=on_store_retry)
        #: Each stream's creation time at the last setup: another one means it was deleted
        #: (from outside) and made again, and what this node keeps in it is written again.
        self._incarnations: dict[str, object] = {}
        link.add_setup(self._setup)
        link.require_streams(STREAM, *(_kv_stream(b) for b in (SESSIONS_BUCKET, OWNERS_BUCKET)))

    def start(self) -> None:
        """Run the store's retry sweep and the session records' refresh (broker's loop)."""
        self.store.start()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_records())

    # -- setup on every NATS connection ---------------------------------------------------

    async def _setup(self, _client: NatsClient, js: JetStreamContext) -> None:
        self._sessions_kv, self._owners_kv = [
            await _open_bucket(js, bucket, self.session_expiry_s)
            for bucket in (SESSIONS_BUCKET, OWNERS_BUCKET)
        ]
        await self._open_stream(js, self._sessions_kv)
        stream_new = await self._made_again(js, STREAM)
        records_new = await self._made_again(js, _kv_stream(SESSIONS_BUCKET))
        owners_new = await self._made_again(js, _kv_stream(OWNERS_BUCKET))
        if stream_new or records_new:
            await self._reinstate_sessions(js, records=records_new)
        await self.interest.watch(self._sessions_kv)
        await self._stop_watching()
        if owners_new:  # the claims' revisions were in the old bucket: claim again
            await self._claim_again()
        watcher = await self._owners_kv.watchall()
        self._kv_watcher = watcher
        self._watcher = asyncio.get_running_loop().create_task(self._watch_owners(watcher))

    async def _open_stream(self, js: JetStreamContext, sessions: KeyValue) -> None:
        """Create the message stream *closed*, put the consumers of every persistent session
        recorded in ``sessions`` into it, then open it; or bring an open one to its config.

        A stream made (again) with no consumer in it would take another node's QoS 1 store,
        acknowledge it and drop it (interest retention keeps nothing nobody consumes), so that
        node would PUBACK a message no session ever gets. Closed, it refuses every store
        (:data:`_CLOSED_MAX_MSG_SIZE`): the storing node retries and its PUBACK waits. A node
        that finds the stream closed (its maker died, or is still at it) does the same and
        opens it."""
        config: dict[str, Any] = {
            "name": STREAM,
            "subjects": [SUBJECT_PREFIX + ".>"],
            "retention": RetentionPolicy.INTEREST,
            "storage": StorageType.FILE,
            "max_age": self.session_expiry_s,
            "duplicate_window": min(120.0, self.session_expiry_s),
        }
        try:  # succeeds for a new stream, and for one another node made closed just as here
            await js.add_stream(**config, max_msg_size=_CLOSED_MAX_MSG_SIZE)
            closed = True
        except js_errors.BadRequestError:  # there, open or configured otherwise
            info = await js.stream_info(STREAM)
            closed = info.config.max_msg_size == _CLOSED_MAX_MSG_SIZE
        if closed:
            consumers = 0
            for session_key, filters in (await _recorded_sessions(sessions)).items():
                for topic_filter, qos in filters.items():
                    for subject in filter_subjects(topic_filter) if qos >= 1 else ():
                        await self._ensure_consumer(js, session_key, subject)
                        consumers += 1
            log.info("cluster stream opened stream=%s recorded_consumers=%d", STREAM, consumers)
        await js.update_stream(**config, max_msg_size=-1)

    async def _made_again(self, js: JetStreamContext, stream: str) -> bool:
        """Whether ``stream`` is not the one the last setup found (deleted and made again)."""
        created = (await js.stream_info(stream)).created
        before, self._incarnations[stream] = self._incarnations.get(stream), created
        if before is None or before == created:
            return False
        log.error(
            "cluster stream was deleted and made again stream=%s: what it held is lost; the "
            "sessions connected here are written into it again (docs/faults.md)",
            stream,
        )
        return True

    async def _reinstate_sessions(self, js: JetStreamContext, *, records: bool) -> None:
        """Write the persistent sessions connected here into a stream or bucket made again:
        their records (``records``) from their subscriptions here, and their consumers."""
        for client in self.broker.connected_clients():
            key = client.key
            if not client.persistent or key is None:
                continue
            filters = client.filters()
            if records and filters:
                bucket = self._bucket(self._sessions_kv)
                value = json.dumps({"key": key, "filters": filters}).encode()
                await bucket.put(storage_key(key), value)
            for topic_filter, qos in filters.items():
                for subject in filter_subjects(topic_filter) if qos >= 1 else ():
                    await self._ensure_consumer(js, key, subject)

    async def _claim_again(self) -> None:
        for kv_key, claim in list(self._claims.items()):
            if claim.client.live:
                await self._claim(claim.client)
            elif self._claims.get(kv_key) is claim:
                del self._claims[kv_key]

    def _spawn(self, coroutine: Any) -> None:
        if self._closed:  # a task made now would outlive the node's loop
            coroutine.close()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cluster task failed error=%s", f"{task.exception()!r}"[:200])

    async def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._kv_watcher is not None:
            with contextlib.suppress(*_ERRORS):
                await self._kv_watcher.stop()
            self._kv_watcher = None

    async def close(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self._stop_watching()
        await self.interest.stop()
        await self.store.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _bucket(self, bucket: KeyValue | None) -> KeyValue:
        if bucket is None or not self.link.connected:
            raise NotConnectedError("the cluster's key-value buckets are not reachable")
        return bucket

    # -- publishing -----------------------------------------------------------------------

    def needs_store(self, topic: str) -> bool:
        """Whether a QoS 1 message on ``topic`` is stored before its PUBACK: a persistent
        subscription somewhere wants it, or NATS is away and we cannot know."""
        return not self.link.connected or self.interest.needs_store(topic)

    async def forward(
        self,
        topic: str,
        data: bytes,
        force_qos: int | None,
        stored: asyncio.Future[bool] | None,
        durable: bool,
    ) -> None:
        if not durable:
            if stored is not None and not stored.done():
                stored.set_result(True)  # nobody needs it kept: the PUBACK goes now
            await self.router.forward(topic, data, force_qos)
            return
        headers = {STORED_HEADER: "1"}
        if force_qos is not None:
            headers[QOS_HEADER] = str(force_qos)
        await self.store.store(subject_of_topic(topic), data, headers, stored)

    @property
    def unacked_stores(self) -> int:
        """QoS 1 messages whose PUBACK waits for JetStream."""
        return self.store.pending

    # -- the broadcast's view -------------------------------------------------------------

    def served_from_store(self, persistent: bool, sub_qos: int) -> bool:
        return persistent and sub_qos >= 1

    # -- subscriptions of persistent sessions ---------------------------------------------

    async def subscribed(self, client: LocalClient, topic_filter: str, qos: int) -> bool:
        try:
            await self.router.want(topic_filter)
        except _ERRORS as exc:  # wanted still: subscribed again on the next connection
            log.warning("cluster interest not sent filter=%r error=%r", topic_filter[:200], exc)
        key = client.key
        if not client.persistent or key is None:
            return True
        try:
            js = self.link.js
            if qos >= 1:
                for subject in filter_subjects(topic_filter):
                    await self._ensure_consumer(js, key, subject)
            await self._update_record(js, key, topic_filter, qos)
        except _ERRORS as exc:
            log.warning(
                "persistent subscription refused client_id=%s filter=%r error=%s "
                "(the cluster store is unreachable)",
                key,
                topic_filter[:200],
                f"{exc!r}"[:200],
            )
            return False
        current = client.current()
        if qos >= 1 and current is not None:
            self._pull_filter(current, topic_filter)
        return True

    def unsubscribed(self, client: LocalClient, topic_filter: str) -> None:
        if not self.broker.has_subscribers(topic_filter):
            self._spawn(self._release(topic_filter))
        key = client.key
        if not client.persistent or key is None:
            return
        if not client.connected:
            return  # amqtt expiring its copy of a session that may live on another node
        self._spawn(self._forget_filter(key, topic_filter))

    async def _release(self, topic_filter: str) -> None:
        if not self.broker.has_subscribers(topic_filter):  # still no local subscriber
            await self.router.unwant(topic_filter)

    async def _forget_filter(self, session_key: str, topic_filter: str) -> None:
        js = self.link.js
        for subject in filter_subjects(topic_filter):
            with contextlib.suppress(js_errors.NotFoundError):
                await js.delete_consumer(STREAM, _consumer_name(session_key, subject))
        await self._update_record(js, session_key, topic_filter, None)

    async def _ensure_consumer(self, js: JetStreamContext, session_key: str, subject: str) -> None:
        await js.add_consumer(
            STREAM,
            durable_name=_consumer_name(session_key, subject),
            filter_subject=subject,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=_ACK_WAIT_S,
            max_ack_pending=1000,
            inactive_threshold=self.session_expiry_s,
        )

    async def _record(self, js: JetStreamContext, session_key: str) -> dict[str, int]:
        bucket = self._bucket(self._sessions_kv)
        try:
            entry = await bucket.get(storage_key(session_key))
        except js_errors.KeyNotFoundError:
            return {}
        if not entry.value:
            return {}
        filters = json.loads(entry.value).get("filters", {})
        return {str(f): int(q) for f, q in filters.items()}

    async def _update_record(
        self, js: JetStreamContext, session_key: str, topic_filter: str, qos: int | None
    ) -> None:
        filters = await self._record(js, session_key)
        if qos is None:
            filters.pop(topic_filter, None)
        else:
            filters[topic_filter] = qos
        bucket = self._bucket(self._sessions_kv)
        value = json.dumps({"key": session_key, "filters": filters}).encode()
        revision = await bucket.put(storage_key(session_key), value)
        # Known here at once (the watch brings it to the other nodes within milliseconds).
        self.interest.apply(storage_key(session_key), value, revision)

    async def _refresh_records(self) -> None:
        """Re-write the records of the persistent sessions connected here four times per
        session expiry, so that only the records of sessions gone for longer age out (the
        buckets' TTL) and every node's store interest forgets them."""
        while True:
            await asyncio.sleep(self.session_expiry_s / 4)
            self._forget_ended_claims()
            for client in self.broker.connected_clients():
                key = client.key
                if not client.persistent or not key:
                    continue
                try:
                    bucket = self._bucket(self._sessions_kv)
                    entry = await bucket.get(storage_key(key))
                    if entry.value:
                        revision = await bucket.put(storage_key(key), entry.value)
                        self.interest.apply(storage_key(key), entry.value, revision)
                except js_errors.KeyNotFoundError:
                    continue
                except _ERRORS as exc:
                    log.warning("session record refresh failed client_id=%s error=%r", key, exc)
                    break

    async def _drop_record(self, js: JetStreamContext, session_key: str) -> None:
        for topic_filter in await self._record(js, session_key):
            await self._forget_filter(session_key, topic_filter)
        bucket = self._bucket(self._sessions_kv)
        with contextlib.suppress(js_errors.KeyNotFoundError):
            await bucket.delete(storage_key(session_key))

    # -- a client's session starts on this node -------------------------------------------

    async def stored_session(self, session_key: str) -> bool:
        """Whether the cluster holds a persistent session for ``session_key`` (made on any
        node): CONNACK's session-present flag. False when it cannot tell within
        :data:`_LOOKUP_S` (NATS away): the session is still resumed once NATS answers."""
        try:
            bucket = self._bucket(self._sessions_kv)
            async with asyncio.timeout(_LOOKUP_S):
                entry = await bucket.get(storage_key(session_key))
        except js_errors.KeyNotFoundError:
            return False
        except _ERRORS:
            return False
        return bool(entry.value)

    def session_started(self, client: LocalClient) -> None:
        if client.key is not None:
            self._spawn(self._resume(client))

    async def _resume(self, client: LocalClient) -> None:
        key = client.key
        assert key is not None
        # Retried for as long as this connection lives: a connection left without a claim
        # would never be taken over by a later one on another node.
        attempt = 0
        while True:
            try:
                js = self.link.js
                await self._claim(client)
                if not client.persistent:
                    await self._drop_record(js, key)
                    return
                filters = await self._record(js, key)
                break
            except _ERRORS as exc:
                if attempt == 0:
                    log.warning(
                        "session resume waits for the cluster client_id=%s error=%r", key, exc
                    )
                await asyncio.sleep(min(0.2 * 1.5**attempt, 2.0))
                attempt += 1
                if not client.attached:
                    return
        for topic_filter, qos in filters.items():
            client.restore_filter(topic_filter, qos)
            with contextlib.suppress(*_ERRORS):  # still wanted: made on the next connection
                await self.router.want(topic_filter)
            if qos >= 1:
                for subject in filter_subjects(topic_filter):
                    await self._ensure_consumer(js, key, subject)
                self._pull_filter(client, topic_filter)

    def _pull_filter(self, client: LocalClient, topic_filter: str) -> None:
        assert client.key is not None
        for subject in filter_subjects(topic_filter):
            self._spawn(self._pull(client, subject))

    async def _pull(self, client: LocalClient, subject: str) -> None:
        """Deliver a persistent session's stored messages while it is connected here.

        Pipelined (:class:`~broker.cluster.pull.ConsumerPull`): requests go out while fewer
        than :data:`_DELIVERY_WINDOW` messages are being delivered or asked for, so the next
        batch arrives while the last one waits for its PUBACKs. When the client leaves,
        what the requests still bring is handed back (NAK) until they have expired. A
        consumer deleted while the subscription holds (its stream deleted from outside) is
        made again."""
        key = client.key
        assert key is not None
        consumer = _consumer_name(key, subject)
        loop = asyncio.get_running_loop()
        inflight = 0
        wake = asyncio.Event()
        pull: ConsumerPull | None = None

        def room() -> int:
            return _DELIVERY_WINDOW - inflight - (pull.outstanding if pull else 0)

        def delivered(_task: asyncio.Task[None]) -> None:
            nonlocal inflight
            inflight -= 1
            if room() >= _FETCH_BATCH:
                wake.set()

        def arrived(message: Msg) -> None:
            nonlocal inflight
            if not client.live:
                self._spawn(self._hand_back(message))
                wake.set()
                return
            inflight += 1
            task = loop.create_task(self._deliver(client, message))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            task.add_done_callback(delivered)

        try:
            while client.live:
                try:
                    nats_client = self.link.client
                    if pull is None or pull.client is not nats_client:
                        if pull is not None:
                            with contextlib.suppress(*_ERRORS):
                                await pull.close()
                        pull = ConsumerPull(
                            nats_client,
                            STREAM,
                            consumer,
                            arrived,
                            wake.set,
                            expires_s=_FETCH_WAIT_S,
                        )
                        await pull.start()
                    if pull.deleted:
                        if not self._still_wanted(client, subject):
                            return  # unsubscribed (the consumer was deleted)
                        deleted, pull = pull, None
                        with contextlib.suppress(*_ERRORS):
                            await deleted.close()
                        await self._ensure_consumer(self.link.js, key, subject)
                        log.warning(
                            "stored deliveries' consumer was deleted: made again client_id=%s",
                            key,
                        )
                        continue
                    if room() >= _FETCH_BATCH or (pull.outstanding == 0 and room() > 0):
                        await pull.request(room())
                except _ERRORS:
                    pull = None
                    await asyncio.sleep(0.2)
                    continue
                wake.clear()
                try:
                    async with asyncio.timeout(_FETCH_WAIT_S + 0.5):
                        await wake.wait()
                except TimeoutError:
                    pull.expired()
        finally:
            if pull is not None:
                current = asyncio.current_task()
                if current is None or not current.cancelling():
                    await self._drain_pull(pull, wake)
                with contextlib.suppress(*_ERRORS):
                    await pull.close()

    def _still_wanted(self, client: LocalClient, subject: str) -> bool:
        """Whether ``client`` still holds a QoS >= 1 subscription served by ``subject``."""
        return any(
            qos >= 1 and subject in filter_subjects(topic_filter)
            for topic_filter, qos in client.filters().items()
        )

    async def _drain_pull(self, pull: ConsumerPull, wake: asyncio.Event) -> None:
        """Wait until the requests sent can bring nothing more (``arrived`` hands back what
        they bring: redelivered at once, not after the ack wait)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pull.expires_s + 0.5):
                while not pull.settled and not pull.deleted:
                    wake.clear()
                    await wake.wait()

    async def _hand_back(self, message: Msg) -> None:
        with contextlib.suppress(*_ERRORS):
            await message.nak()

    async def _deliver(self, client: LocalClient, msg: Msg) -> None:
        try:
            topic = topic_of_subject(msg.subject)
        except ValueError:
            await msg.term()
            return
        if not client.may_receive(topic):
            await msg.ack()
            return
        try:
            await client.deliver(topic, msg.data, 1)
        except asyncio.CancelledError:
            # amqtt cancels the PUBACK waiters of a connection that ends: handed back at
            # once, not after the ack wait (the client may resume on another node now).
            self._spawn(self._hand_back(msg))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the node shuts down
            return
        except Exception:  # noqa: BLE001 - the client went away: redeliver elsewhere/later
            with contextlib.suppress(*_ERRORS):
                await msg.nak()
            return
        with contextlib.suppress(*_ERRORS):
            await msg.ack()

    # -- ownership ------------------------------------------------------------------------

    async def _claim(self, client: LocalClient) -> None:
        """Write this connection's claim on its session key. Registered before the write is
        sent, so that every other claim the watcher sees for the key from then on is
        weighed against it: one that the stream ordered after ours closes this connection,
        also when the watcher brings it before our write has returned."""
        session_key = client.key
        assert session_key is not None
        owners = self._bucket(self._owners_kv)
        kv_key = storage_key(session_key)
        token = f"{self.node} {self._nonce}-{secrets.token_hex(4)}"
        claim = _Claim(token, session_key, client)
        self._claims[kv_key] = claim  # replaces this node's claim of an older connection
        try:
            revision = await owners.put(kv_key, token.encode())
        except BaseException:
            if self._claims.get(kv_key) is claim:
                del self._claims[kv_key]
            raise
        if self._claims.get(kv_key) is not claim:
            return  # a newer connection on this node claimed the key meanwhile
        claim.revision = revision
        if claim.newer > revision:
            self._taken_over(kv_key, claim, claim.newer_owner)

    def _taken_over(self, kv_key: str, claim: _Claim, owner: str) -> None:
        if self._claims.get(kv_key) is claim:
            del self._claims[kv_key]
        if not claim.client.live:
            return  # that connection has ended already: nothing of a newer one is touched
        if self._close_connection(claim.session_key):
            log.info(
                "session taken over by another node client_id=%s owner=%s",
                claim.session_key,
                owner,
            )

    def _forget_ended_claims(self) -> None:
        for kv_key, claim in list(self._claims.items()):
            if claim.revision and not claim.client.live:
                del self._claims[kv_key]

    async def _watch_owners(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None or entry.key is None:
                continue
            claim = self._claims.get(entry.key)
            if claim is None:
                continue
            value = (entry.value or b"").decode()
            if not value or value == claim.token:
                continue  # our own claim, or a record aged out or deleted (nobody claims)
            revision, owner = entry.revision or 0, value.split(" ", 1)[0]
            if claim.revision == 0:  # ours is in flight: weighed once its revision is known
                if revision > claim.newer:
                    claim.newer, claim.newer_owner = revision, owner
            elif revision > claim.revision:
                self._taken_over(entry.key, claim, owner)
