"""The broker's mTLS listener: the accept loop, and each connection through its steps.

amqtt is configured with a single listener of type ``external`` (its documented hook for
connections accepted elsewhere); this module owns the socket. For each connection:

1. TLS (:class:`~broker.connection.TlsConnection`) with ``CERT_REQUIRED`` under a deadline;
   a failed handshake is counted by reason (:func:`~broker.connection.classify_handshake_error`).
2. The CONNECT gate (:class:`~broker.gate.ConnectGate`) admits or refuses the first packet.
3. Admitted: the connection is indexed (:class:`~broker.session_index.SessionIndex`: by
   serial and device for revocation, by session key for takeover) and its byte stream,
   CONNECT included, is served by amqtt (:meth:`CertfleetBroker.serve`) until it ends.

Everything it uses is passed in when it is built; nothing here knows amqtt's insides.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from contextlib import suppress

from amqtt.errors import AMQTTError, MQTTError, NoDataError

from broker.amqtt_adapter import CertfleetBroker
from broker.auth import Refusal
from broker.connection import StreamWriter, TlsConnection, classify_handshake_error
from broker.gate import ConnectGate
from broker.metrics import BrokerMetrics
from broker.session_index import SessionIndex

__all__ = ["MqttTlsListener"]

log = logging.getLogger(__name__)

#: At shutdown, how long sessions get to finish routing what their clients sent (the
#: reader's own end-of-stream wait is 5 s).
_CLOSE_DRAIN_S = 6.0


class MqttTlsListener:
    """Accepts mTLS clients and runs each through the gate into amqtt."""

    def __init__(
        self,
        *,
        broker: CertfleetBroker,
        ssl_context: ssl.SSLContext,
        gate: ConnectGate,
        sessions: SessionIndex,
        metrics: BrokerMetrics,
        handshake_timeout_s: float = 10.0,
        max_packet_bytes: int = 256 * 1024,
    ) -> None:
        self.broker = broker
        self.ssl_context = ssl_context
        self.gate = gate
        self.sessions = sessions
        self.metrics = metrics
        self.handshake_timeout_s = handshake_timeout_s
        self.max_packet_bytes = max_packet_bytes
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections past the handshake whose task runs (in the gate or in amqtt).
        self._open: set[TlsConnection] = set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0 = ephemeral); return the bound port. ``reuse_port``:
        SO_REUSEPORT, so several broker processes (cluster nodes) share the port and the
        kernel spreads connections over them."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection,
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=4096,
        )
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self, drain_s: float = _CLOSE_DRAIN_S) -> None:
        """Stop accepting; end every admitted session after amqtt has routed what its client
        sent (at most ``drain_s``), then drop whatever is left and wait for the tasks."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._open):
            connection.end_input()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=drain_s)
        for connection in list(self._open):
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            self._server = None

    def _new_connection(self) -> TlsConnection:
        return TlsConnection(
            self.ssl_context,
            self,
            handshake_timeout_s=self.handshake_timeout_s,
            max_packet_bytes=self.max_packet_bytes,
        )

    # -- ConnectionEvents -----------------------------------------------------------------

    def connection_opened(self, connection: TlsConnection) -> None:
        self.metrics.tls_connections.inc()

    def connection_closed(self, connection: TlsConnection) -> None:
        # The connection stays indexed until amqtt has finished with the session (see
        # _serve): amqtt may still be routing the last messages the client sent.
        self.metrics.tls_connections.dec()

    def handshake_failed(self, connection: TlsConnection, exc: ssl.SSLError) -> None:
        reason = classify_handshake_error(exc)
        self.gate.refused(connection, reason, f"tls: {exc.reason or exc}")

    def handshake_timed_out(self, connection: TlsConnection) -> None:
        self.gate.refused(
            connection, Refusal.HANDSHAKE_TIMEOUT, f"no handshake in {self.handshake_timeout_s}s"
        )

    def handshake_completed(self, connection: TlsConnection) -> None:
        self._open.add(connection)
        task = asyncio.get_running_loop().create_task(self._serve_guarded(connection))
        self._tasks.add(task)
        task.add_done_callback(self._connection_task_done)

    def keepalive_expired(self, connection: TlsConnection) -> None:
        admission = self.sessions.admission_of(connection)
        log.info(
            "session dropped reason=keepalive client_id=%s",
            admission.identity.name if admission else "?",
        )

    # -- per connection -------------------------------------------------------------------

    def _connection_task_done(self, task: asyncio.Task[None]) -> None:
        """A connection's task ended: an unexpected error is logged and counted, not lost."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.metrics.connection_errors.inc()
        log.error("connection task failed error=%s", f"{type(exc).__name__}: {exc}"[:300])

    async def _serve_guarded(self, connection: TlsConnection) -> None:
        """:meth:`_serve`, closing the socket on an unexpected error (then logged and counted
        by :meth:`_connection_task_done`) instead of leaving the client hanging."""
        try:
            await self._serve(connection)
        except Exception:
            connection.abort()
            raise
        finally:
            self._open.discard(connection)

    async def _serve(self, connection: TlsConnection) -> None:
        admission = await self.gate.admit(connection)
        if admission is None:
            return
        reader = connection.reader
        assert reader is not None
        key = admission.session_key
        self.sessions.add(connection, admission)
        self.metrics.connections.inc()
        try:
            await self.broker.serve(reader, StreamWriter(connection))
        except (AMQTTError, MQTTError, NoDataError, ConnectionError) as exc:
            log.info(
                "session ended client_id=%s error=%s", admission.identity.name, type(exc).__name__
            )
        finally:
            self.gate.withdraw(key, connection)
            self.metrics.connections.dec()
            self.sessions.remove(connection)
            connection.close()
