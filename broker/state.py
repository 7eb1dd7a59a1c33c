"""What a broker node must keep across a restart, as plain values.

- every **persistent session** (clean session off): its session key (:mod:`broker.sessions`),
  its subscriptions, the QoS 1/2 messages queued for it and not yet acknowledged by its
  client, and when its client went away (for the session expiry);
- every **retained message**.

:class:`BrokerState` is produced from and restored into amqtt by
:class:`broker.amqtt_adapter.CertfleetBroker` (``persistent_state()`` /
``restore_state()``) and stored by a :class:`StateStore`: a file in the data folder for a
single node (:mod:`broker.persistence`), another store (JetStream) for a cluster. Nothing
here knows amqtt or a storage format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["BrokerState", "SessionState", "StateStore", "StoredMessage"]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One application message: topic, payload and QoS (0, 1 or 2)."""

    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True, slots=True)
class SessionState:
    """One persistent session. ``disconnected_at`` is a Unix time, None while connected."""

    key: str
    subscriptions: tuple[tuple[str, int], ...] = ()
    queued: tuple[StoredMessage, ...] = ()
    disconnected_at: float | None = None


@dataclass(frozen=True, slots=True)
class BrokerState:
    """Every persistent session and every retained message of one broker node."""

    sessions: tuple[SessionState, ...] = ()
    retained: tuple[StoredMessage, ...] = field(default_factory=tuple)

    @property
    def queued_count(self) -> int:
        """Messages queued over all sessions."""
        return sum(len(session.queued) for session in self.sessions)


class StateStore(Protocol):
    """Where a node's :class:`BrokerState` lives across restarts (the seam a cluster's store
    replaces).

    The broker calls :meth:`load` once before it listens and restores what it returns;
    runs :meth:`keep_saved` as a supervised background task with a function producing the
    current state; and, at shutdown, once every client is gone and every accepted message
    is routed, :meth:`save` with the final state. :meth:`problems` feeds ``/healthz``.
    """

    def load(self) -> BrokerState:
        """The state kept by the last run (empty when there is none or it was unusable)."""

    async def save(self, state: BrokerState) -> bool:
        """Keep ``state``; False when it could not be kept (logged and counted; the caller
        tries again with a newer state later). Never raises for a storage failure."""

    async def keep_saved(self, snapshot: Callable[[], BrokerState]) -> None:
        """Keep the state saved while the broker runs (until cancelled)."""

    def problems(self) -> list[str]:
        """What is wrong with the store right now, one sentence each (empty: healthy)."""
