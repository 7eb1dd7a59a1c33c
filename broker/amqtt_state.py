"""The adapter's persistence: a broker's persistent sessions and retained messages as plain
values (:class:`broker.state.BrokerState`) and back (part of the amqtt adapter; see
:mod:`broker.amqtt_adapter`, items 7 and 8, pinned by
``tests/broker/test_amqtt_adapter_pins.py``).

What it reads of amqtt: the broker's ``sessions`` and ``subscriptions`` mappings and
``retained_messages``; a session's ``inflight_out`` (item 7), ``retained_messages`` (the
queue of what waits for its client), ``clean_session`` / ``is_anonymous`` /
``last_disconnect_time`` and ``transitions.state`` (item 8). A session is restored with
public calls: ``create_offline_session`` (amqtt's own, for a session whose client is away),
an entry in the public ``sessions`` mapping (what amqtt's ``BrokerContext.add_subscription``
does), ``add_subscription`` (which applies our ACL again) and a
``RetainedApplicationMessage`` per queued message on its queue.

:class:`broker.amqtt_adapter.CertfleetBroker` offers these as its methods
(``capture_inflight``, ``persistent_state``, ``restore_state``, ``discard_session``), the
names the server uses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from amqtt.broker import RetainedApplicationMessage
from amqtt.session import Session

from broker.state import BrokerState, SessionState, StoredMessage

if TYPE_CHECKING:
    from broker.amqtt_adapter import CertfleetBroker

__all__ = ["capture_inflight", "discard_session", "persistent_state", "restore_state"]


def _persistent_sessions(broker: CertfleetBroker) -> list[Session]:
    return [
        session
        for session, _handler in broker.sessions.values()
        if session.clean_session is False and not session.is_anonymous and session.client_id
    ]


def capture_inflight(broker: CertfleetBroker) -> dict[str, list[StoredMessage]]:
    """The messages sent to persistent sessions' clients and not yet acknowledged, by
    session key (amqtt forgets them when the connection ends: take them first)."""
    return {
        session.client_id: [
            StoredMessage(m.topic, bytes(m.data), m.qos or 0) for m in session.inflight_out.values()
        ]
        for session in _persistent_sessions(broker)
        if session.inflight_out
    }


def persistent_state(
    broker: CertfleetBroker, inflight: Mapping[str, Sequence[StoredMessage]] | None = None
) -> BrokerState:
    """Every persistent session (subscriptions; messages in flight to its client, then
    those queued while it is away) and every retained message, as plain values.
    ``inflight`` replaces what is in flight now (:func:`capture_inflight`, taken before
    the connections were closed). Loop thread only; does not yield."""
    if inflight is None:
        inflight = capture_inflight(broker)
    filters: dict[str, list[tuple[str, int]]] = {}
    for topic_filter, subscribers in broker.subscriptions.items():
        for subscriber, qos in subscribers:
            if subscriber.client_id:
                filters.setdefault(subscriber.client_id, []).append((topic_filter, qos))
    sessions = []
    for session in _persistent_sessions(broker):
        key = session.client_id
        queued = list(inflight.get(key, ()))
        queue = session.retained_messages
        waiting = [queue.get_nowait() for _ in range(queue.qsize())]
        for message in waiting:  # put back, same order, before anything can run
            queue.put_nowait(message)
        queued += [StoredMessage(m.topic, bytes(m.data), m.qos or 0) for m in waiting]
        connected = session.transitions.state == "connected"
        sessions.append(
            SessionState(
                key=key,
                subscriptions=tuple(sorted(filters.get(key, ()))),
                queued=tuple(queued),
                disconnected_at=None if connected else _disconnected_at(session),
            )
        )
    retained = tuple(
        StoredMessage(topic, bytes(message.data), message.qos or 0)
        for topic, message in sorted(broker.retained_messages.items())
        if message.data
    )
    return BrokerState(sessions=tuple(sorted(sessions, key=lambda s: s.key)), retained=retained)


async def restore_state(broker: CertfleetBroker, state: BrokerState) -> int:
    """Recreate the persistent sessions (offline, as after their client left) and the
    retained messages of ``state``; before the listener starts. Returns the sessions
    restored. A subscription the ACL refuses now is not restored."""
    for message in state.retained:
        await broker.retain_message(None, message.topic, message.payload, message.qos)
    restored = 0
    for saved in state.sessions:
        if saved.key in broker.sessions:
            continue
        handler, session = broker.create_offline_session(saved.key)
        session.clean_session = False
        if saved.disconnected_at is not None:
            session.last_disconnect_time = int(saved.disconnected_at)
        broker.sessions[saved.key] = (session, handler)
        for subscription in saved.subscriptions:
            await broker.add_subscription(subscription, session)
        for message in saved.queued:
            session.retained_messages.put_nowait(
                RetainedApplicationMessage(None, message.topic, message.payload, message.qos)
            )
        restored += 1
    return restored


def discard_session(broker: CertfleetBroker, key: str) -> bool:
    """Forget a session that is not connected: its subscriptions and queued messages
    (a decommissioned device's). False when there is none or its client is connected."""
    entry = broker.sessions.get(key)
    if entry is None or entry[0].transitions.state == "connected":
        return False
    session = entry[0]
    for topic_filter in list(broker.subscriptions):
        subscribers = broker.subscriptions[topic_filter]
        subscribers[:] = [(s, qos) for s, qos in subscribers if s is not session]
        if not subscribers:
            del broker.subscriptions[topic_filter]
    del broker.sessions[key]
    session.clear_queues()
    return True


def _disconnected_at(session: Session) -> float:
    return float(session.last_disconnect_time or time.time())
