"""amqtt session keys: devices and services kept apart by identity kind.

amqtt keys every session (subscriptions, queued messages) by the MQTT client id. A device
whose id equals a service's name (``registry``) would share that key with the service: a
clean-session CONNECT of the device would wipe the service's subscriptions. The CONNECT gate
(:mod:`broker.listener`) therefore hands amqtt a key made from the certificate's identity,
never the client's own string:

- a device ``d`` -> ``d`` (what it sends as its client id);
- a service ``s`` -> ``service:s``; one of several processes of a service (two registry
  replicas) -> ``service:s/<instance>``, when it sends ``s/<instance>`` as its client id, so
  that the processes do not take each other's session over.

Neither ``:`` nor ``/`` can occur in a name (:data:`fleetcore.profile.NAME_PATTERN`), so no
device key can ever equal a service key. The key also *is* the identity for the topic ACL,
for as long as amqtt keeps the session: a persistent session that is offline still has one,
so the QoS 1 messages queued for it pass the ACL's receive check.
"""

from __future__ import annotations

from functools import lru_cache

from fleetcore.errors import IdentityError
from fleetcore.profile import NAME_PATTERN, Identity, IdentityKind

__all__ = ["SERVICE_PREFIX", "identity_of_key", "service_instance", "session_key"]

#: Prefix of the amqtt session key of a service identity.
SERVICE_PREFIX = "service:"
_INSTANCE_SEPARATOR = "/"


def session_key(identity: Identity, instance: str | None = None) -> str:
    """The amqtt session key (client id handed to amqtt) of an admitted identity."""
    if identity.kind is not IdentityKind.SERVICE:
        return identity.name
    key = SERVICE_PREFIX + identity.name
    return key if instance is None else key + _INSTANCE_SEPARATOR + instance


def service_instance(identity: Identity, client_id: str) -> tuple[bool, str | None]:
    """Whether a service may use ``client_id`` in strict mode, and the instance it names.

    Accepted: ``s``, ``service:s``, ``s/<instance>``, ``service:s/<instance>``.
    """
    name = client_id.removeprefix(SERVICE_PREFIX)
    base, sep, instance = name.partition(_INSTANCE_SEPARATOR)
    if base != identity.name:
        return False, None
    if not sep:
        return True, None
    return NAME_PATTERN.fullmatch(instance) is not None, instance


@lru_cache(maxsize=65_536)  # asked twice per routed message; a fleet's keys fit
def identity_of_key(key: str, trust_domain: str) -> Identity | None:
    """The identity a session key stands for; None for a key the gate never hands out."""
    kind, name = IdentityKind.DEVICE, key
    if key.startswith(SERVICE_PREFIX):
        kind = IdentityKind.SERVICE
        name, sep, instance = key[len(SERVICE_PREFIX) :].partition(_INSTANCE_SEPARATOR)
        if sep and NAME_PATTERN.fullmatch(instance) is None:
            return None
    if NAME_PATTERN.fullmatch(name) is None:
        return None
    try:
        return Identity(trust_domain, kind, name)
    except IdentityError:
        return None
