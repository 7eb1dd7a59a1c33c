"""Single-node durability: the broker's state in one file of the data folder.

Like Mosquitto's ``persistence true``: a node without a cluster keeps its persistent
sessions (clean session off: subscriptions and the QoS 1/2 messages queued for them) and its
retained messages in ``<data>/broker/state-<node>.json`` (node: ``CERTFLEET_BROKER_NODE``),
so a restart does not lose what was acknowledged. :class:`StateFile` is the
:class:`~broker.state.StateStore` of a single node; a cluster replaces it (and then no file
is written).

When it is written
    Every ``CERTFLEET_BROKER_PERSIST_INTERVAL_S`` (default 1 s) when the state changed
    (a snapshot equal to the last one written is not written again), and once at shutdown
    after every client is gone and every accepted message is routed. So a SIGTERM restart
    keeps everything acknowledged; a SIGKILL (or power loss) loses at most what was
    acknowledged since the last write: the interval plus the time of one write. See
    docs/faults.md for why the bound is not nil.

How it is written
    A temporary file written in full, fsynced, renamed over the old one and the folder
    fsynced (:func:`fleetcore.layout.write_durable`), mode 0600 (payloads are the fleet's
    telemetry). Encoding and writing run in a worker thread; the snapshot itself is taken
    on the event loop.

Format (version 1, JSON)
    ``{"format": "certfleet-broker-state", "version": 1, "node": ..., "saved_at": <unix>,
    "sessions": [{"key", "subscriptions": [[filter, qos]], "queued": [message],
    "disconnected_at"}], "retained": [message]}`` with ``message = {"topic", "qos",
    "payload": <base64>}``. Everything is validated on load; a file that fails (unreadable,
    not JSON, another format or version, a bad field) is logged as one clear error, moved
    aside to ``state-<node>.json.corrupt-<UTC time>`` for inspection, counted
    (``certfleet_broker_state_load_failures_total``), and the broker starts empty.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import StateFileError
from broker.state import BrokerState, SessionState, StoredMessage
from fleetcore.clock import utcnow
from fleetcore.layout import write_durable

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "StateFile",
    "StateFileError",
    "decode_state",
    "encode_state",
    "state_path",
]

log = logging.getLogger(__name__)

STATE_FORMAT = "certfleet-broker-state"
STATE_VERSION = 1

_Qos = Annotated[int, Field(ge=0, le=2)]
_Topic = Annotated[str, Field(min_length=1, max_length=65535)]


def state_path(broker_dir: Path, node: str) -> Path:
    """The state file of broker node ``node``."""
    return broker_dir / f"state-{node}.json"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: _Topic
    qos: _Qos
    payload: str  # base64


class _Session(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Annotated[str, Field(min_length=1, max_length=256)]
    subscriptions: list[tuple[_Topic, _Qos]]
    queued: list[_Message]
    disconnected_at: float | None


class _StateFileBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["certfleet-broker-state"]
    version: Literal[1]
    node: str
    saved_at: float
    sessions: list[_Session]
    retained: list[_Message]


def _message_out(message: StoredMessage) -> dict[str, object]:
    return {
        "topic": message.topic,
        "qos": message.qos,
        "payload": base64.b64encode(message.payload).decode("ascii"),
    }


def _message_in(message: _Message) -> StoredMessage:
    try:
        payload = base64.b64decode(message.payload, validate=True)
    except (binascii.Error, ValueError):
        raise StateFileError(f"payload of a message on {message.topic!r} is not base64") from None
    return StoredMessage(message.topic, payload, message.qos)


def encode_state(state: BrokerState, node: str) -> bytes:
    """The file body of ``state`` (format version 1)."""
    body = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "node": node,
        "saved_at": time.time(),
        "sessions": [
            {
                "key": session.key,
                "subscriptions": [list(sub) for sub in session.subscriptions],
                "queued": [_message_out(m) for m in session.queued],
                "disconnected_at": session.disconnected_at,
            }
            for session in state.sessions
        ],
        "retained": [_message_out(m) for m in state.retained],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def decode_state(data: bytes) -> BrokerState:
    """A :class:`BrokerState` from a file body, or :class:`StateFileError` saying why not."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateFileError(f"not JSON ({exc})") from None
    if isinstance(raw, dict) and raw.get("format") == STATE_FORMAT:
        version = raw.get("version")
        if version != STATE_VERSION:
            raise StateFileError(
                f"format version {version!r}; this certfleet reads version {STATE_VERSION}"
            )
    try:
        body = _StateFileBody.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise StateFileError(f"{where}: {first['msg']} ({exc.error_count()} problem(s))") from None
    return BrokerState(
        sessions=tuple(
            SessionState(
                key=session.key,
                subscriptions=tuple((f, q) for f, q in session.subscriptions),
                queued=tuple(_message_in(m) for m in session.queued),
                disconnected_at=session.disconnected_at,
            )
            for session in body.sessions
        ),
        retained=tuple(_message_in(m) for m in body.retained),
    )


def _ignore_write(_ok: bool, _state: BrokerState) -> None:
    """Default write hook."""


def _ignore() -> None:
    """Default load-failure hook."""


class StateFile:
    """The :class:`~broker.state.StateStore` of a single broker node: one JSON file."""

    def __init__(
        self,
        path: Path,
        *,
        node: str,
        interval_s: float = 1.0,
        on_write: Callable[[bool, BrokerState], None] = _ignore_write,
        on_load_failure: Callable[[], None] = _ignore,
    ) -> None:
        self.path = path
        self.node = node
        self.interval_s = interval_s
        self._on_write = on_write
        self._on_load_failure = on_load_failure
        self._last_written: BrokerState | None = None
        #: Why the last write failed, while it has not succeeded since.
        self.persist_error: str | None = None
        #: Where an unusable state file found at start was moved to.
        self.moved_aside: Path | None = None
        # A save cancelled at shutdown may still be writing in its thread: writes are
        # serialised, and one older than what was already written is skipped.
        self._write_lock = threading.Lock()
        self._saves = 0
        self._written_seq = 0

    def load(self) -> BrokerState:
        """The state of the last run; an unusable file is moved aside (broker starts empty)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return BrokerState()
        except OSError as exc:
            return self._unusable(f"unreadable ({exc})")
        try:
            state = decode_state(data)
        except StateFileError as exc:
            return self._unusable(str(exc))
        self._last_written = state
        log.info(
            "broker state loaded path=%s sessions=%d queued=%d retained=%d",
            self.path,
            len(state.sessions),
            state.queued_count,
            len(state.retained),
        )
        return state

    def _unusable(self, why: str) -> BrokerState:
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            self.path.replace(aside)
            self.moved_aside = aside
        except OSError as exc:
            aside_note = f"could not be moved aside ({exc})"
        else:
            aside_note = f"moved to {aside}"
        log.error(
            "broker state unusable path=%s error=%s; %s; starting without persistent sessions "
            "and retained messages",
            self.path,
            why[:300],
            aside_note,
        )
        self._on_load_failure()
        return BrokerState()

    async def save(self, state: BrokerState) -> bool:
        """Write ``state`` unless it equals what was written last; never raises for I/O."""
        if state == self._last_written and self.persist_error is None:
            return True
        self._saves += 1
        try:
            await asyncio.to_thread(self._write, state, self._saves)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            if self.persist_error is None:
                log.error(
                    "broker state not persisted path=%s error=%s (retrying every %.1fs)",
                    self.path,
                    error,
                    self.interval_s,
                )
            self.persist_error = error
            self._on_write(False, state)
            return False
        if self.persist_error is not None:
            log.info("broker state persisted again path=%s", self.path)
        self.persist_error = None
        self._last_written = state
        self._on_write(True, state)
        return True

    def _write(self, state: BrokerState, seq: int) -> None:
        data = encode_state(state, self.node)
        with self._write_lock:
            if seq < self._written_seq:
                return
            write_durable(self.path, data)
            self._written_seq = seq

    async def keep_saved(self, snapshot: Callable[[], BrokerState]) -> None:
        """Save a fresh snapshot every ``interval_s`` (when it changed), until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.save(snapshot())

    def problems(self) -> list[str]:
        if self.persist_error is None:
            return []
        return [
            f"broker state not persisted to {self.path}: {self.persist_error} "
            "(sessions kept in memory; retrying)"
        ]
