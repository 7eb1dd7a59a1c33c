"""amqtt's session and handler, read and driven: the adapter's one home for what a session's
state, its away-queue and its handler's delivery look like inside amqtt 0.12 (items 3, 8
and 17 of :mod:`broker.amqtt_adapter`, pinned by ``tests/broker/test_amqtt_adapter_pins.py``).

Modules outside the adapter (:mod:`broker.shared_subscriptions`) hold amqtt sessions as
opaque values (:data:`Session`, for annotations) and ask these functions about them.
"""

from __future__ import annotations

from typing import Any

from amqtt.broker import RetainedApplicationMessage
from amqtt.session import Session

__all__ = ["Session", "is_connected", "keeps_session", "publish", "queue_while_away"]


def is_connected(session: Session) -> bool:
    """Whether the session's client is connected (``Session.transitions.state``)."""
    return bool(session.transitions.state == "connected")


def keeps_session(session: Session) -> bool:
    """Whether the session outlives its connection (clean session off)."""
    return session.clean_session is False


def queue_while_away(session: Session, topic: str, data: bytes, qos: int) -> None:
    """Queue a message for a persistent session whose client is away: amqtt sends it when
    the client reconnects (``Session.retained_messages``, item 3)."""
    session.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, data, qos))


async def publish(handler: Any, topic: str, data: bytes, qos: int) -> None:
    """Send a message on a client's protocol handler, retain flag off; a QoS 1 one returns
    at its PUBACK (``CancelledError`` when the connection ends first, ``TimeoutError``
    after amqtt's 5 s)."""
    await handler.mqtt_publish(topic, data, qos, retain=False)
