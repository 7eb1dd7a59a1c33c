"""Topic ACL: each device only under ``devices/<own-id>/``; services read telemetry.

Rules (DESIGN.md "MQTT topics and ACL"):

- device ``d`` may publish to ``devices/d/<anything>`` and subscribe to filters under
  ``devices/d/`` (``devices/d/#`` included); nothing else, so ``#``, ``+/...``, ``$SYS/...``
  and ``devices/dx/...`` (an id sharing a prefix) are refused;
- a service may subscribe to ``devices/+/telemetry`` and ``devices/+/cert/renew`` (or the
  same for one device id) and publish only to ``devices/<id>/cert/issued``.

Every refusal is counted (``certfleet_broker_acl_refusals_total{action=...}``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from factory.profile import NAME_PATTERN, Identity, IdentityKind

__all__ = ["DeviceTopicPlugin", "is_allowed"]

log = logging.getLogger(__name__)

_SERVICE_SUBSCRIPTIONS = ("telemetry", "cert/renew")
_SERVICE_PUBLICATIONS = ("cert/issued",)


def _device_level_and_rest(topic: str) -> tuple[str, str] | None:
    """``devices/<id>/<rest>`` -> (id, rest); None for anything else."""
    if not topic.startswith("devices/"):
        return None
    device_id, sep, rest = topic[8:].partition("/")
    if not sep or not device_id or not rest:
        return None
    return device_id, rest


def _device_may(device_id: str, topic: str, action: Action) -> bool:
    parts = _device_level_and_rest(topic)
    if parts is None or parts[0] != device_id:
        return False
    rest = parts[1]
    if action is Action.PUBLISH:
        return "+" not in rest and "#" not in rest
    return True  # SUBSCRIBE filters and RECEIVE topics under the device's own prefix


def _service_may(topic: str, action: Action) -> bool:
    parts = _device_level_and_rest(topic)
    if parts is None:
        return False
    device_level, rest = parts
    if action is Action.PUBLISH:
        return rest in _SERVICE_PUBLICATIONS and NAME_PATTERN.fullmatch(device_level) is not None
    if rest not in _SERVICE_SUBSCRIPTIONS:
        return False
    return device_level == "+" or NAME_PATTERN.fullmatch(device_level) is not None


def is_allowed(identity: Identity, topic: str, action: Action) -> bool:
    """Whether ``identity`` may ``action`` (publish, subscribe, receive) on ``topic``."""
    if identity.kind is IdentityKind.DEVICE:
        return _device_may(identity.name, topic, action)
    if identity.kind is IdentityKind.SERVICE:
        return _service_may(topic, action)
    return False


class DeviceTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt topic plugin applying :func:`is_allowed` to the session's identity.

    The listener records each admitted session's identity; :meth:`bind` attaches the lookup
    (client id -> identity) and the refusal counter after the broker is built.
    """

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._identity_of: Callable[[str], Identity | None] = lambda _client_id: None
        self._on_refused: Callable[[Action], None] = lambda _action: None
        self._on_allowed: Callable[[Action], None] = lambda _action: None

    def bind(
        self,
        identity_of: Callable[[str], Identity | None],
        on_refused: Callable[[Action], None],
        on_allowed: Callable[[Action], None],
    ) -> None:
        self._identity_of = identity_of
        self._on_refused = on_refused
        self._on_allowed = on_allowed

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        return self.check(session, topic, action)

    def check(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        """The ACL decision for a session (synchronous: see broker.core.CertfleetBroker)."""
        if session is None or topic is None or action is None or session.client_id is None:
            return False
        identity = self._identity_of(session.client_id)
        if identity is not None and is_allowed(identity, topic, action):
            self._on_allowed(action)
            return True
        self._on_refused(action)
        if action is not Action.RECEIVE:
            log.warning(
                "topic refused client_id=%s action=%s topic=%r",
                session.client_id,
                action.value,
                topic[:200],
            )
        return False
