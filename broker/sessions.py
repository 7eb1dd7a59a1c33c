"""amqtt session keys: devices and services kept apart by identity kind.

amqtt keys every session (subscriptions, queued messages) by the MQTT client id. A device
whose id equals a service's name (``registry``) would share that key with the service: a
clean-session CONNECT of the device would wipe the service's subscriptions. The CONNECT gate
(:mod:`broker.listener`) therefore hands amqtt a key made from the certificate's identity,
never the client's own string:

- a device ``d`` -> ``d`` (what it sends as its client id),
- a service ``s`` -> ``service:s`` (a service may send ``s`` or ``service:s``).

A ``:`` cannot occur in a name (:data:`factory.profile.NAME_PATTERN`), so no device key can
ever equal a service key. The key also *is* the identity for the topic ACL, for as long as
amqtt keeps the session: a persistent session that is offline still has one, so the QoS 1
messages queued for it pass the ACL's receive check.
"""

from __future__ import annotations

from factory.errors import IdentityError
from factory.profile import NAME_PATTERN, Identity, IdentityKind

__all__ = ["SERVICE_PREFIX", "accepted_client_ids", "identity_of_key", "session_key"]

#: Prefix of the amqtt session key of a service identity.
SERVICE_PREFIX = "service:"


def session_key(identity: Identity) -> str:
    """The amqtt session key (client id handed to amqtt) of an admitted identity."""
    if identity.kind is IdentityKind.SERVICE:
        return SERVICE_PREFIX + identity.name
    return identity.name


def accepted_client_ids(identity: Identity) -> tuple[str, ...]:
    """The client ids an identity may send in strict mode."""
    key = session_key(identity)
    return (identity.name,) if key == identity.name else (identity.name, key)


def identity_of_key(key: str, trust_domain: str) -> Identity | None:
    """The identity a session key stands for; None for a key the gate never hands out."""
    kind = IdentityKind.DEVICE
    name = key
    if key.startswith(SERVICE_PREFIX):
        kind, name = IdentityKind.SERVICE, key[len(SERVICE_PREFIX) :]
    if NAME_PATTERN.fullmatch(name) is None:
        return None
    try:
        return Identity(trust_domain, kind, name)
    except IdentityError:
        return None
