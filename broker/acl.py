"""Topic ACL: each device only under ``devices/<own-id>/``; services read telemetry.

Rules (DESIGN.md "MQTT topics and ACL"):

- device ``d`` may publish to ``devices/d/<anything>`` except its renewal answer topic
  ``devices/d/cert/issued``, and subscribe to filters under ``devices/d/``
  (``devices/d/#`` included); nothing else, so ``#``, ``+/...``, ``$SYS/...`` and
  ``devices/dx/...`` (an id sharing a prefix) are refused;
- the renewal service (the registry's identity, ``service/registry`` by default) may
  subscribe to ``devices/+/telemetry`` and ``devices/+/cert/renew`` (or the same for one
  device id) and publish only to ``devices/<id>/cert/issued``;
- any other service may only subscribe to ``devices/+/telemetry`` (or one device's).

A will is a PUBLISH the broker makes on the client's behalf: :func:`will_refusal` applies
the same rules to it at CONNECT, and refuses a retained will on a renewal topic (renewal
requests and answers are never retained).

Every refusal is counted (``certfleet_broker_acl_refusals_total{action=...}``); the log
gets at most one line per client per ``REFUSAL_LOG_INTERVAL_S`` (:class:`RefusalLog`), so a
device stuck in a loop of refused publishes cannot flood it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from amqtt.contexts import Action

from broker.sessions import identity_of_key
from fleetcore.profile import NAME_PATTERN, Identity, IdentityKind
from fleetcore.topics import (
    ISSUED,
    RENEW,
    TELEMETRY,
    has_wildcard,
    is_renewal_topic,
    split_device_topic,
)

__all__ = [
    "REFUSAL_LOG_INTERVAL_S",
    "RENEWAL_SERVICE",
    "RefusalLog",
    "TopicAcl",
    "is_allowed",
    "will_refusal",
]

log = logging.getLogger(__name__)

#: The service whose identity alone answers renewals (the registry's MQTT client).
RENEWAL_SERVICE = "registry"


def _device_may(device_id: str, topic: str, action: Action) -> bool:
    parts = split_device_topic(topic)
    if parts is None or parts[0] != device_id:
        return False
    rest = parts[1]
    if action is Action.PUBLISH:
        # Only the renewal service answers renewals, even on the device's own topic.
        return not has_wildcard(rest) and rest != ISSUED
    return True  # SUBSCRIBE filters and RECEIVE topics under the device's own prefix


def _service_may(topic: str, action: Action, *, renews: bool) -> bool:
    parts = split_device_topic(topic)
    if parts is None:
        return False
    device_level, rest = parts
    if action is Action.PUBLISH:
        return renews and rest == ISSUED and NAME_PATTERN.fullmatch(device_level) is not None
    readable = (TELEMETRY, RENEW) if renews else (TELEMETRY,)
    if rest not in readable:
        return False
    return device_level == "+" or NAME_PATTERN.fullmatch(device_level) is not None


def is_allowed(
    identity: Identity, topic: str, action: Action, *, renewal_service: str = RENEWAL_SERVICE
) -> bool:
    """Whether ``identity`` may ``action`` (publish, subscribe, receive) on ``topic``."""
    if identity.kind is IdentityKind.DEVICE:
        return _device_may(identity.name, topic, action)
    if identity.kind is IdentityKind.SERVICE:
        return _service_may(topic, action, renews=identity.name == renewal_service)
    return False


def will_refusal(
    identity: Identity,
    topic: str,
    *,
    retain: bool,
    renewal_service: str = RENEWAL_SERVICE,
) -> str | None:
    """Why a CONNECT's will may not be published for ``identity``; None when it may."""
    if not is_allowed(identity, topic, Action.PUBLISH, renewal_service=renewal_service):
        return f"will topic {topic[:200]!r} is outside what {identity.uri} may publish"
    if retain and is_renewal_topic(topic):
        return f"retained will on renewal topic {topic[:200]!r} (renewals are never retained)"
    return None


#: A client's refused topics are logged at most once per this many seconds.
REFUSAL_LOG_INTERVAL_S = 10.0


class RefusalLog:
    """Topic refusals as warnings: the first of a client's at once, then at most one per
    ``interval_s``, carrying how many were left out since the last line.

    Keeps one entry per recently refused client, at most ``max_clients`` (older entries are
    dropped first, which only means a client's next refusal is logged at once).
    """

    def __init__(
        self,
        interval_s: float = REFUSAL_LOG_INTERVAL_S,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.max_clients = max_clients
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # client id -> (logged at, left out)

    def refused(self, client_id: str, action: Action, topic: str) -> None:
        """Record one refusal; log it unless this client was logged within the interval."""
        now = self._clock()
        entry = self._last.get(client_id)
        if entry is not None and now - entry[0] < self.interval_s:
            self._last[client_id] = (entry[0], entry[1] + 1)
            return
        left_out = entry[1] if entry is not None else 0
        if entry is None and len(self._last) >= self.max_clients:
            self._forget_before(now - self.interval_s)
        self._last[client_id] = (now, 0)
        log.warning(
            "topic refused client_id=%s action=%s topic=%r refusals_not_logged=%d",
            client_id,
            action.value,
            topic[:200],
            left_out,
        )

    def _forget_before(self, cutoff: float) -> None:
        stale = [client for client, (at, _) in self._last.items() if at < cutoff]
        for client in stale:
            del self._last[client]
        if len(self._last) >= self.max_clients:  # all recent: drop the oldest half
            by_age = sorted(self._last, key=lambda client: self._last[client][0])
            for client in by_age[: len(by_age) // 2 + 1]:
                del self._last[client]


class TopicAcl:
    """The ACL of this broker: :func:`is_allowed` applied to a session key's identity.

    A session's identity is read from its amqtt key (:mod:`broker.sessions`), so it is known
    while a persistent session is offline. Every decision is reported to ``count`` (the
    metrics: messages in and out, refusals by action); refused publishes and subscribes are
    logged through :class:`RefusalLog`. Synchronous and pure apart from that, so amqtt's
    hot path calls it directly (:class:`broker.amqtt_adapter.CertfleetBroker`).
    """

    def __init__(
        self,
        trust_domain: str,
        *,
        renewal_service: str = RENEWAL_SERVICE,
        count: Callable[[Action, bool], None] = lambda _action, _allowed: None,
    ) -> None:
        self.trust_domain = trust_domain
        self.renewal_service = renewal_service
        self._count = count
        self.refusal_log = RefusalLog()

    def identity_of(self, session_key: str) -> Identity | None:
        """The identity a session key stands for (None: not a key the gate hands out)."""
        return identity_of_key(session_key, self.trust_domain)

    def check(self, session_key: str | None, topic: str | None, action: Action | None) -> bool:
        """Whether the session ``session_key`` may ``action`` on ``topic``; counted."""
        if session_key is None or topic is None or action is None:
            return False
        identity = self.identity_of(session_key)
        if identity is not None and is_allowed(
            identity, topic, action, renewal_service=self.renewal_service
        ):
            self._count(action, True)
            return True
        self._count(action, False)
        if action is not Action.RECEIVE:
            self.refusal_log.refused(session_key, action, topic)
        return False
