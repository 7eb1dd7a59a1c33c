"""Shared subscriptions (``$share/<group>/<filter>``) on one node, for MQTT 3.1.1 clients.

A client that subscribes to ``$share/<group>/<filter>`` joins the group ``<group>`` of
``<filter>``; each message matching the filter goes to **one** connected member of the
group (round robin), not to all of them. Rules (docs/broker.md, "Shared subscriptions"):

- the ACL checks ``<filter>`` exactly as a plain subscription's filter (a device may not
  join a group on another device's topics); ``<group>`` is 1-64 of ``A-Za-z0-9_.-``;
- the QoS granted is at most 1;
- retained messages are not sent when a member joins (MQTT 5, 4.8.2);
- a QoS 1 message a member received but did not acknowledge goes to another member when
  the member disconnects (or does not acknowledge it within amqtt's 5 s): at least once,
  nothing acknowledged lost;
- each member has at most :data:`MAX_INFLIGHT` QoS 1 messages in flight (sent, not yet
  acknowledged; Mosquitto's ``max_inflight_messages`` has the same job). When every
  connected member is at its window, messages wait in the group's backlog, in order, and go
  out as acknowledgements free the windows. A slow member thus never holds more than its
  window, so it does not miss amqtt's 5 s acknowledgement bound merely for being behind,
  and its messages are not handed over (and sent twice) while it works through them. A
  backlog over :data:`MAX_BACKLOG` sends past the windows rather than lose anything;
- with no member connected, a QoS 1 message is queued for a persistent (clean session off)
  member while it is away, and dropped otherwise (as for a plain subscription with nobody
  connected);
- a membership is part of its session: kept while a persistent session is away (the
  client gets messages again when it reconnects), gone with a clean session. It is not
  saved across restarts: clients subscribe again (paho's ``on_connect`` does).

The groups live here, never in amqtt's ``subscriptions`` mapping, so amqtt's own routing,
retained-message replay and persistent state never see a ``$share`` filter.
:class:`broker.amqtt_adapter.CertfleetBroker` hands every admitted message to
:meth:`SharedSubscriptions.route` and every ``$share`` SUBSCRIBE/UNSUBSCRIBE here. In a
cluster (:mod:`broker.cluster.shared`) a :class:`RemoteGroups` decides which groups are
served here and which through NATS.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.amqtt_session import (
    Session,
    is_connected,
    keeps_session,
    publish,
    queue_while_away,
)
from broker.errors import SharedSubscriptionError
from fleetcore.topics import topic_matches

__all__ = [
    "GROUP_PATTERN",
    "MAX_BACKLOG",
    "MAX_HANDOVERS",
    "MAX_INFLIGHT",
    "MAX_SHARED_QOS",
    "SHARE_PREFIX",
    "RemoteGroups",
    "ShareFilter",
    "SharedGroup",
    "SharedSubscriptionError",
    "SharedSubscriptions",
    "parse_share",
]

log = logging.getLogger(__name__)

SHARE_PREFIX = "$share/"
GROUP_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: Shared subscriptions are granted QoS 0 or 1 (a hand-over is at least once).
MAX_SHARED_QOS = 1
#: How often one message is handed to another member before it counts as lost.
MAX_HANDOVERS = 8
#: QoS 1 messages in flight to one member at most (module doc).
MAX_INFLIGHT = 100
#: Messages waiting for a free window, per group, before sending goes past the windows.
MAX_BACKLOG = 100_000


@dataclass(frozen=True)
class ShareFilter:
    """One shared subscription's group and filter."""

    group: str
    topic_filter: str

    @property
    def key(self) -> str:
        """The filter as the client wrote it (``$share/<group>/<filter>``)."""
        return f"{SHARE_PREFIX}{self.group}/{self.topic_filter}"


def parse_share(topic_filter: str) -> ShareFilter | None:
    """The group and filter of a ``$share/...`` filter; None for a plain filter.

    Raises :class:`SharedSubscriptionError` for a malformed one."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, _, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if GROUP_PATTERN.fullmatch(group) is None:
        raise SharedSubscriptionError(
            f"shared subscription {topic_filter[:200]!r}: the group must be 1-64 of A-Za-z0-9_.-"
        )
    if not inner:
        raise SharedSubscriptionError(f"shared subscription {topic_filter[:200]!r} has no filter")
    levels = inner.split("/")
    last = len(levels) - 1
    if any("#" in level and (level != "#" or i != last) for i, level in enumerate(levels)):
        raise SharedSubscriptionError(f"'#' must be the last level of {topic_filter[:200]!r}")
    if any("+" in level and level != "+" for level in levels):
        raise SharedSubscriptionError(f"'+' must fill a whole level of {topic_filter[:200]!r}")
    return ShareFilter(group, inner)


def _connected(session: Session) -> bool:
    return is_connected(session)


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A message in a group's backlog (every member's window full)."""

    topic: str
    data: bytes
    force_qos: int | None
    hops: int
    gone: Session | None
    left: bool
    remote: bool


@dataclass
class SharedGroup:
    """The members of one group of one filter, in the order they joined, with each
    member's QoS 1 messages in flight and the messages waiting for a window."""

    share: ShareFilter
    members: list[tuple[Session, int]] = field(default_factory=list)
    _next: int = 0
    #: client id -> QoS 1 messages sent to it and not yet acknowledged (or failed).
    inflight: dict[str, int] = field(default_factory=dict)
    backlog: deque[_Waiting] = field(default_factory=deque)

    def window_open(self, session: Session, window: int) -> bool:
        """Whether ``session`` may take one more QoS 1 message."""
        return self.inflight.get(session.client_id, 0) < window

    def sent(self, session: Session) -> None:
        """A QoS 1 message went to ``session``: it occupies one place of its window."""
        self.inflight[session.client_id] = self.inflight.get(session.client_id, 0) + 1

    def settled(self, session: Session) -> None:
        """A QoS 1 message to ``session`` was acknowledged, or its delivery failed."""
        left = self.inflight.get(session.client_id, 0) - 1
        if left > 0:
            self.inflight[session.client_id] = left
        else:
            self.inflight.pop(session.client_id, None)

    def connected(self) -> list[tuple[Session, int]]:
        """The members whose client is connected now."""
        return [(s, q) for s, q in self.members if _connected(s)]

    def any_connected(self) -> bool:
        """Whether a member's client is connected now (per message: no list built)."""
        return any(_connected(s) for s, _ in self.members)

    def pick(
        self, exclude: Session | None = None, window: int | None = None
    ) -> tuple[Session, int] | None:
        """The next connected member (round robin over the members), another than
        ``exclude`` when there is one; None when no member is connected. With ``window``,
        only members with fewer than that many QoS 1 messages in flight count.

        Called for every message: it walks the members from the last one picked and
        builds no list (the benchmark's profile, issue 24)."""
        members = self.members
        count = len(members)
        fallback: tuple[Session, int] | None = None
        inflight = self.inflight
        for step in range(1, count + 1):
            index = (self._next + step) % count
            member = members[index]
            if not _connected(member[0]):
                continue
            if window is not None and inflight.get(member[0].client_id, 0) >= window:
                continue
            if member[0] is exclude:
                fallback = member
                continue
            self._next = index
            return member
        return fallback

    def others_connected(self, gone: Session | None, left: bool) -> bool:
        """Whether a member is connected, ``gone`` not counted when it ``left``."""
        return any(_connected(s) and not (left and s is gone) for s, _ in self.members)

    def away(self) -> tuple[Session, int] | None:
        """A persistent member whose client is away (it queues QoS 1 messages)."""
        for session, qos in self.members:
            if keeps_session(session) and not _connected(session):
                return session, qos
        return None


class RemoteGroups(Protocol):
    """The cluster's side of shared subscriptions (:mod:`broker.cluster.shared`)."""

    def serve_here(self, group: SharedGroup | None, share: ShareFilter) -> bool:
        """Whether a local publisher's message for ``share`` is delivered by this node
        (``group``: this node's members, None when it has none)."""

    def remote_shares(self, topic: str) -> list[ShareFilter]:
        """The groups elsewhere in the cluster whose filter matches ``topic``."""

    async def send(
        self, share: ShareFilter, topic: str, data: bytes, qos: int | None, hops: int
    ) -> bool:
        """Hand a message to one other node with a member of ``share``; False if it cannot."""

    def joined(self, share: ShareFilter) -> None:
        """The first local member of ``share`` joined."""

    def left(self, share: ShareFilter) -> None:
        """The last local member of ``share`` left."""


HandlerOf = Callable[[Session], Any]
MayReceive = Callable[[Session, str], bool]
Spawn = Callable[[asyncio.Future[Any]], None]


class SharedSubscriptions:
    """This node's shared groups and their delivery.

    ``handler_of`` gives a session's amqtt protocol handler, ``may_receive`` the ACL's
    RECEIVE check, ``spawn`` keeps a delivery task (the broker's running deliveries).
    ``on_delivered``/``on_handed_over``/``on_lost`` count messages (the metrics).
    """

    def __init__(
        self,
        *,
        handler_of: HandlerOf,
        may_receive: MayReceive,
        spawn: Spawn,
        on_delivered: Callable[[], None] = lambda: None,
        on_handed_over: Callable[[], None] = lambda: None,
        on_lost: Callable[[], None] = lambda: None,
        window: int = MAX_INFLIGHT,
    ) -> None:
        self._handler_of = handler_of
        #: QoS 1 messages in flight to one member at most (module doc).
        self.window = window
        self._may_receive = may_receive
        self._spawn = spawn
        self._on_delivered = on_delivered
        self._on_handed_over = on_handed_over
        self._on_lost = on_lost
        self.groups: dict[ShareFilter, SharedGroup] = {}
        self.remote: RemoteGroups | None = None

    def count(self, *, handed_over: Callable[[], None], lost: Callable[[], None]) -> None:
        """Report hand-overs and lost messages to these (the broker's metrics)."""
        self._on_handed_over = handed_over
        self._on_lost = lost

    @property
    def groups_or_remote(self) -> bool:
        """Whether a message may have to go to a group (here or on another node)."""
        return bool(self.groups) or self.remote is not None

    # -- membership -----------------------------------------------------------------------

    def join(self, share: ShareFilter, session: Session, qos: int) -> int:
        """Add ``session`` to the group (again: its QoS is updated); the QoS granted."""
        granted = min(qos, MAX_SHARED_QOS)
        group = self.groups.get(share)
        if group is None:
            group = self.groups[share] = SharedGroup(share)
            if self.remote is not None:
                self.remote.joined(share)
        known = any(s is session for s, _ in group.members)
        group.members = [(s, q) for s, q in group.members if s.client_id != session.client_id]
        group.members.append((session, granted))
        if known:
            return granted  # subscribed again (a client's watchdog): nothing to log
        log.info(
            "shared subscription joined client_id=%s group=%s filter=%r",
            session.client_id,
            share.group,
            share.topic_filter[:200],
        )
        return granted

    def leave(self, share: ShareFilter, session: Session) -> bool:
        """Remove ``session`` from the group; False when it was not a member."""
        group = self.groups.get(share)
        if group is None:
            return False
        before = len(group.members)
        group.members = [(s, q) for s, q in group.members if s.client_id != session.client_id]
        if not group.members:
            del self.groups[share]
            if self.remote is not None:
                self.remote.left(share)
            if group.backlog:  # no member left to wait for: route what waited afresh
                waiting, group.backlog = list(group.backlog), deque()
                self._spawn(asyncio.ensure_future(self._reroute(share, waiting)))
        return len(group.members) != before

    def leave_all(self, session: Session) -> None:
        """Remove ``session`` from every group (its session is deleted)."""
        for share in [s for s, g in self.groups.items() if any(m is session for m, _ in g.members)]:
            self.leave(share, session)

    # -- routing --------------------------------------------------------------------------

    async def route(self, topic: str, data: bytes, force_qos: int | None) -> None:
        """A locally admitted message: one member of each matching group gets it (here, or
        on another node through :attr:`remote`)."""
        done: set[ShareFilter] = set()
        for share, group in list(self.groups.items()):
            if not topic_matches(topic, share.topic_filter):
                continue
            done.add(share)
            remote = self.remote
            if remote is not None and not remote.serve_here(group, share):
                sent = await remote.send(share, topic, data, force_qos, 0)
                if sent:
                    continue
            await self.deliver(share, topic, data, force_qos)
        if self.remote is not None:
            for share in self.remote.remote_shares(topic):
                if share not in done:
                    await self.remote.send(share, topic, data, force_qos, 0)

    async def deliver(
        self,
        share: ShareFilter,
        topic: str,
        data: bytes,
        force_qos: int | None,
        *,
        gone: Session | None = None,
        left: bool = False,
        hops: int = 0,
        remote: bool = True,
    ) -> None:
        """Give the message to one member of this node's group ``share`` (another node's,
        through :attr:`remote`, when none is connected here and ``remote``). ``gone``: the
        member that just failed to acknowledge it, tried last, and not at all when it
        ``left`` (its connection closed rather than being slow to acknowledge). When every
        connected member's window is full, the message waits in the group's backlog."""
        group = self.groups.get(share)
        if group is None:
            await self._no_member(share, None, topic, data, force_qos, hops, gone, remote)
            return
        windowed = force_qos != 0
        if windowed and group.backlog and len(group.backlog) < MAX_BACKLOG:
            # behind what already waits (order kept); the next acknowledgement drains it
            group.backlog.append(_Waiting(topic, data, force_qos, hops, gone, left, remote))
            return
        picked = group.pick(gone, self.window if windowed else None)
        if windowed and picked is None and group.others_connected(gone, left):
            if len(group.backlog) < MAX_BACKLOG:
                group.backlog.append(_Waiting(topic, data, force_qos, hops, gone, left, remote))
                return
            picked = group.pick(gone)  # backlog full: past the windows, nothing lost
        await self._dispatch(share, group, picked, topic, data, force_qos, hops, gone, left, remote)

    async def _dispatch(
        self,
        share: ShareFilter,
        group: SharedGroup,
        picked: tuple[Session, int] | None,
        topic: str,
        data: bytes,
        force_qos: int | None,
        hops: int,
        gone: Session | None,
        left: bool,
        remote: bool,
    ) -> None:
        """Send to the member picked, or to no member here (:meth:`_no_member`)."""
        if picked is not None and picked[0] is gone and left:
            picked = None
        if picked is None:
            await self._no_member(share, group, topic, data, force_qos, hops, gone, remote)
            return
        session, sub_qos = picked
        if not self._may_receive(session, topic):
            return
        handler = self._handler_of(session)
        if handler is None:
            await self._no_member(share, group, topic, data, force_qos, hops, gone, remote)
            return
        qos = min(force_qos if force_qos is not None else sub_qos, MAX_SHARED_QOS)
        if qos >= 1:
            group.sent(session)
        self._spawn(
            asyncio.ensure_future(
                self._send(share, group, session, handler, topic, data, qos, hops)
            )
        )

    async def _drain(self, share: ShareFilter) -> None:
        """Send what waits in the group's backlog while a member's window is open."""
        group = self.groups.get(share)
        while group is not None and group.backlog:
            first = group.backlog[0]
            picked = group.pick(first.gone, self.window)
            if picked is None and group.others_connected(first.gone, first.left):
                return  # every window full again: the next acknowledgement drains on
            group.backlog.popleft()
            await self._dispatch(
                share,
                group,
                picked,
                first.topic,
                first.data,
                first.force_qos,
                first.hops,
                first.gone,
                first.left,
                first.remote,
            )
            group = self.groups.get(share)

    async def _reroute(self, share: ShareFilter, waiting: list[_Waiting]) -> None:
        """Route the backlog of a group whose last member left (it may have a new one)."""
        for w in waiting:
            await self.deliver(
                share,
                w.topic,
                w.data,
                w.force_qos,
                gone=w.gone,
                left=w.left,
                hops=w.hops,
                remote=w.remote,
            )

    async def _no_member(
        self,
        share: ShareFilter,
        group: SharedGroup | None,
        topic: str,
        data: bytes,
        force_qos: int | None,
        hops: int,
        gone: Session | None,
        remote: bool = True,
    ) -> None:
        """No member connected here: another node's (when ``remote``), else a persistent
        member's queue."""
        if (
            remote
            and self.remote is not None
            and await self.remote.send(share, topic, data, force_qos, hops)
        ):
            return
        away = group.away() if group is not None else None
        if gone is not None and keeps_session(gone) and group is not None:
            away = next(((s, q) for s, q in group.members if s is gone), away)
        qos = min(force_qos if force_qos is not None else (away[1] if away else 0), 1)
        if away is not None and qos >= 1 and self._may_receive(away[0], topic):
            queue_while_away(away[0], topic, data, qos)  # sent when it reconnects
            return
        if qos >= 1:
            self._on_lost()
            log.warning(
                "shared message dropped group=%s topic=%r reason=no_member_connected",
                share.group,
                topic[:200],
            )

    async def _send(
        self,
        share: ShareFilter,
        group: SharedGroup,
        session: Session,
        handler: Any,
        topic: str,
        data: bytes,
        qos: int,
        hops: int,
    ) -> None:
        left = True
        try:
            await publish(handler, topic, data, qos)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the broker shuts down
            # amqtt cancels the PUBACK waiters of a connection that closed
        except TimeoutError:
            left = False  # no PUBACK within amqtt's 5 s with a window's worth: stuck
        except Exception as exc:  # noqa: BLE001 - the write failed: the connection is gone
            log.debug("shared delivery failed client_id=%s error=%r", session.client_id, exc)
        else:
            self._on_delivered()
            if qos >= 1:
                group.settled(session)
                await self._drain(share)
            return
        if qos == 0:
            return  # at most once
        group.settled(session)
        if hops >= MAX_HANDOVERS:
            self._on_lost()
            log.warning(
                "shared message dropped group=%s topic=%r reason=handed_over_%d_times",
                share.group,
                topic[:200],
                hops,
            )
        else:
            self._on_handed_over()
            log.info(
                "shared message handed over group=%s from_client_id=%s topic=%r",
                share.group,
                session.client_id,
                topic[:200],
            )
            await self.deliver(share, topic, data, qos, gone=session, left=left, hops=hops + 1)
        await self._drain(share)
