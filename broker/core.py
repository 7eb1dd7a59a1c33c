"""amqtt's Broker with the topic check on a fast path.

amqtt asks topic plugins through ``PluginManager.map_plugin_topic``, which wraps each call
in a task and gathers the results, and it does so twice for every routed message (the
publisher's PUBLISH and each subscriber's RECEIVE). Our ACL (:mod:`broker.acl`) is a pure,
synchronous function of the session's identity and the topic, so :class:`CertfleetBroker`
calls the bound :class:`~broker.acl.DeviceTopicPlugin` directly. The plugin stays
registered with amqtt (and would answer through the ordinary path if unbound).
"""

from __future__ import annotations

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.session import Session

from broker.acl import DeviceTopicPlugin

__all__ = ["CertfleetBroker"]


class CertfleetBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """The amqtt broker certfleet runs."""

    _acl: DeviceTopicPlugin | None = None

    def use_topic_plugin(self, plugin: DeviceTopicPlugin) -> None:
        self._acl = plugin

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        acl = self._acl
        if acl is None:
            return bool(await super()._topic_filtering(session, topic, action))
        return acl.check(session, topic, action)
