"""The live sessions of this broker node, by certificate serial, device id and session key.

Every admitted connection is indexed here while it is open, and nowhere else:

- by **session key** (:mod:`broker.sessions`): one live connection per key. A second
  admission of the same key takes the session over: :meth:`SessionIndex.add` aborts the
  older connection ([MQTT-3.1.4-2]; amqtt does not, for a clean-session CONNECT it only
  deletes the old session);
- by **serial** and by **device id**, for revocation: :meth:`SessionIndex.drop` disconnects
  every session that authenticated with a revoked serial, or any session of a
  decommissioned device (device identities only: a service of the same name is untouched).

The index holds connections through :class:`LiveConnection` (``abort()`` and ``is_closed``)
and knows nothing of TLS, amqtt or metrics, so another transport or a cluster's session
ownership can use it as it is. One event loop only (no locking).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from broker.auth import Admission
from fleetcore.profile import IdentityKind

__all__ = ["LiveConnection", "LiveSession", "SessionIndex"]

log = logging.getLogger(__name__)


class LiveConnection(Protocol):
    """A client connection the index can cut (implemented by TlsConnection)."""

    def abort(self) -> None:
        """Drop the connection at once."""

    @property
    def is_closed(self) -> bool:
        """Whether the connection is already gone."""


@dataclass(frozen=True, slots=True)
class LiveSession:
    """One indexed connection and what it was admitted as."""

    connection: LiveConnection
    admission: Admission


class SessionIndex:
    """Admitted connections by session key, serial and device id."""

    def __init__(self) -> None:
        self._admitted: dict[LiveConnection, Admission] = {}
        self._by_serial: dict[str, set[LiveConnection]] = {}
        self._by_device: dict[str, set[LiveConnection]] = {}
        #: The live connection of each session key: a new one takes the session over.
        self._by_key: dict[str, LiveConnection] = {}

    def __len__(self) -> int:
        return len(self._admitted)

    def add(self, connection: LiveConnection, admission: Admission) -> LiveConnection | None:
        """Index an admitted connection; return the older connection of the same session
        key that it took over (already aborted), if there was one still open."""
        key = admission.session_key
        previous = self._by_key.get(key)
        taken_over = None
        if previous is not None and previous is not connection and not previous.is_closed:
            log.info("session taken over client_id=%s", admission.identity.name)
            previous.abort()
            taken_over = previous
        self._by_key[key] = connection
        self._admitted[connection] = admission
        self._by_serial.setdefault(admission.serial, set()).add(connection)
        self._by_device.setdefault(admission.identity.name, set()).add(connection)
        return taken_over

    def remove(self, connection: LiveConnection) -> None:
        """Forget a connection (its session ended); unknown connections are ignored."""
        admission = self._admitted.pop(connection, None)
        if admission is None:
            return
        name = admission.identity.name
        for index, key in ((self._by_serial, admission.serial), (self._by_device, name)):
            members = index.get(key)
            if members is not None:
                members.discard(connection)
                if not members:
                    del index[key]
        if self._by_key.get(admission.session_key) is connection:
            del self._by_key[admission.session_key]

    def admission_of(self, connection: LiveConnection) -> Admission | None:
        """What an indexed connection was admitted as (None: not indexed)."""
        return self._admitted.get(connection)

    def session_of_key(self, session_key: str) -> LiveSession | None:
        """The live connection holding a session key, if any."""
        connection = self._by_key.get(session_key)
        if connection is None:
            return None
        return LiveSession(connection, self._admitted[connection])

    def sessions_of_device(self, device_id: str) -> list[LiveSession]:
        """Every live session of the device ``device_id`` (device identities only)."""
        return [
            LiveSession(c, self._admitted[c])
            for c in self._by_device.get(device_id, ())
            if self._admitted[c].identity.kind is IdentityKind.DEVICE
        ]

    def sessions_of_serials(self, serials: Iterable[str]) -> list[LiveSession]:
        """Every live session that authenticated with one of ``serials``."""
        found: set[LiveConnection] = set()
        for serial in serials:
            found |= self._by_serial.get(serial, set())
        return [LiveSession(c, self._admitted[c]) for c in found]

    def drop(
        self, serials: Iterable[str], device_id: str | None = None, *, reason: str = "revoked"
    ) -> list[LiveSession]:
        """Disconnect at once every session that authenticated with one of ``serials`` and,
        for a decommissioned device, every session of ``device_id``; return them.

        The connections stay indexed until their session ends (the listener removes them).
        """
        victims = {s.connection: s for s in self.sessions_of_serials(serials)}
        if device_id is not None:
            victims.update((s.connection, s) for s in self.sessions_of_device(device_id))
        for session in victims.values():
            session.connection.abort()
            log.info(
                "session dropped reason=%s client_id=%s serial=%s",
                reason,
                session.admission.identity.name,
                session.admission.serial,
            )
        return list(victims.values())
