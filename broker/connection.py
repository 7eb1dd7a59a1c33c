"""One mTLS client connection: TLS over memory BIOs, and the byte stream amqtt reads.

Why not ``loop.create_server(ssl=...)``: asyncio's ``SSLProtocol`` allocates a 256 KiB read
buffer per connection (about 340 KB per idle stock-amqtt connection, FIELD-NOTES.md) and
swallows handshake failures without telling anyone why. Driving ``ssl.SSLObject`` over two
``ssl.MemoryBIO`` objects ourselves keeps the per-connection buffers proportional to the
bytes actually in flight, lets us count every handshake refusal by its reason, and puts a
deadline on handshakes. The class is a plain :class:`asyncio.Protocol`, so it runs on the
default loop and on uvloop alike.

This module knows TLS and bytes only: what happens to a connection (counting a refused
handshake, reading the CONNECT, handing the stream to amqtt) is the business of whoever
passes the :class:`ConnectionEvents` (the listener, :mod:`broker.listener`). Nothing here
imports the rest of the broker but the refusal reasons.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter

from broker.auth import Refusal
from broker.errors import PacketTooLargeError

__all__ = [
    "ConnectionEvents",
    "PacketTooLargeError",
    "StreamReader",
    "StreamWriter",
    "TlsConnection",
    "classify_handshake_error",
]

#: Plaintext read per SSLObject.read call: one TLS record at most.
_TLS_READ_CHUNK = 16 * 1024
#: Pause reading from the socket when this many undelivered plaintext bytes are buffered.
_READ_HIGH_WATER = 64 * 1024
#: amqtt acknowledges a QoS 1 PUBLISH when it queues it, before routing it. Stop reading a
#: client's next packet while this many of its messages wait to be routed (backpressure),
#: and resume below the low mark.
_BACKLOG_HIGH = 64
_BACKLOG_LOW = 16
#: At EOF, wait at most this long for the client's queued messages to be routed before amqtt
#: is told the connection ended (amqtt drops a session's unrouted messages at disconnect).
_EOF_DRAIN_S = 5.0
_BACKLOG_POLL_S = 0.002


# OpenSSL X509_V_ERR_* codes (x509_vfy.h) that map to a counted reason.
_VERIFY_REASONS = {
    2: Refusal.UNKNOWN_CA,  # unable to get issuer certificate
    7: Refusal.UNKNOWN_CA,  # certificate signature failure
    9: Refusal.NOT_YET_VALID,
    10: Refusal.EXPIRED,
    18: Refusal.SELF_SIGNED,  # depth zero self-signed
    19: Refusal.UNKNOWN_CA,  # self-signed certificate in chain (someone else's root)
    20: Refusal.UNKNOWN_CA,  # unable to get local issuer certificate
    21: Refusal.UNKNOWN_CA,  # unable to verify the first certificate
    26: Refusal.NOT_CLIENT_CERTIFICATE,  # unsupported certificate purpose (no clientAuth)
}


def classify_handshake_error(exc: ssl.SSLError) -> Refusal:
    """Map a server-side handshake failure to its refusal reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, Refusal.TLS_ERROR)
    if exc.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return Refusal.NO_CERTIFICATE
    return Refusal.TLS_ERROR


class ConnectionEvents(Protocol):
    """What a :class:`TlsConnection` tells its owner (called on the event loop)."""

    def connection_opened(self, connection: TlsConnection) -> None:
        """A TCP connection was accepted (handshake not started)."""

    def connection_closed(self, connection: TlsConnection) -> None:
        """The socket is gone, whatever the reason."""

    def handshake_failed(self, connection: TlsConnection, exc: ssl.SSLError) -> None:
        """The TLS handshake failed (the alert has been sent; the socket closes next)."""

    def handshake_timed_out(self, connection: TlsConnection) -> None:
        """No handshake within the deadline (the socket is aborted next)."""

    def handshake_completed(self, connection: TlsConnection) -> None:
        """TLS is up: ``peer_certificate_der`` and ``reader`` are set."""

    def keepalive_expired(self, connection: TlsConnection) -> None:
        """Nothing arrived for 1.5 x the keep-alive (the socket is aborted next)."""


class TlsConnection(asyncio.Protocol):
    """Server side of one TLS connection; hands the plaintext to a :class:`StreamReader`."""

    __slots__ = (
        "_closed",
        "_drain_waiter",
        "_handshake_timer",
        "_idle_limit",
        "_idle_timer",
        "_events",
        "_handshake_timeout_s",
        "_incoming",
        "_loop",
        "_max_packet_bytes",
        "_outgoing",
        "_plain_out",
        "_paused_writing",
        "_tls",
        "_transport",
        "established",
        "last_received",
        "peer_certificate_der",
        "peername",
        "reader",
        "refused",
    )

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        events: ConnectionEvents,
        *,
        handshake_timeout_s: float,
        max_packet_bytes: int,
    ) -> None:
        self._events = events
        self._handshake_timeout_s = handshake_timeout_s
        self._max_packet_bytes = max_packet_bytes
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Plaintext written by amqtt during this loop iteration, encrypted and sent in one go.
        self._plain_out: bytearray | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject = ssl_context.wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_limit = 0.0
        self.last_received = 0.0
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.established = False
        self.refused = False
        self.peer_certificate_der: bytes | None = None
        self.peername: tuple[str, int] | None = None
        self.reader: StreamReader | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self._transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peername = (str(peer[0]), int(peer[1])) if peer else None
        self._handshake_timer = self._loop.call_later(
            self._handshake_timeout_s, self._on_handshake_timeout
        )
        self._events.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        assert self._loop is not None
        self.last_received = self._loop.time()
        self._incoming.write(data)
        if not self.established:
            self._continue_handshake()
            if not self.established:
                return
        self._read_plaintext()

    def eof_received(self) -> bool | None:
        if self.reader is not None:
            self.reader.feed_eof()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.reader is not None:
            self.reader.feed_eof()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._events.connection_closed(self)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- TLS ------------------------------------------------------------------------------

    def _continue_handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # send the alert so the client learns why
            self.refused = True
            self._events.handshake_failed(self, exc)
            self.close()
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._flush()
        self.peer_certificate_der = self._tls.getpeercert(binary_form=True)
        self.established = True
        self.reader = StreamReader(self, self._max_packet_bytes)
        self._events.handshake_completed(self)

    def _read_plaintext(self) -> None:
        reader = self.reader
        assert reader is not None
        while True:
            try:
                chunk = self._tls.read(_TLS_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                reader.feed_eof()
                break
            except ssl.SSLError:
                self.abort()
                return
            if not chunk:
                reader.feed_eof()
                break
            reader.feed_data(chunk)
        self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending and self._transport is not None:
            self._transport.write(self._outgoing.read())

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if not self.established and not self._closed:
            self.refused = True
            self._events.handshake_timed_out(self)
            self.abort()

    # -- MQTT keep-alive -------------------------------------------------------------------

    def enforce_keepalive(self, keepalive_s: float) -> None:
        """Abort when nothing arrives for 1.5 x the client's keep-alive (MQTT-3.1.2-24).

        One timer per connection, re-armed only when it fires: receiving data costs a
        timestamp, not a timer. amqtt's own read timeout per packet is switched off
        (:func:`broker.amqtt_adapter.tune_session`: it costs a task per packet, and amqtt's
        broker ignores its expiry).
        """
        if keepalive_s <= 0 or self._closed:
            return
        assert self._loop is not None
        self._idle_limit = 1.5 * keepalive_s
        self._idle_timer = self._loop.call_later(self._idle_limit, self._check_idle)

    def _check_idle(self) -> None:
        assert self._loop is not None
        idle = self._loop.time() - self.last_received
        if idle >= self._idle_limit:
            self._idle_timer = None
            self._events.keepalive_expired(self)
            self.abort()
            return
        self._idle_timer = self._loop.call_later(self._idle_limit - idle, self._check_idle)

    # -- used by the writer, the gate and the listener ------------------------------------

    def write(self, data: bytes) -> None:
        """Queue plaintext; everything written in one loop iteration becomes one TLS write
        and one send() (amqtt writes packet by packet, a syscall each would dominate)."""
        if self._closed or not self.established:
            return
        if self._plain_out is None:
            self._plain_out = bytearray(data)
            assert self._loop is not None
            self._loop.call_soon(self._send_plaintext)
        else:
            self._plain_out += data

    def _send_plaintext(self) -> None:
        data, self._plain_out = self._plain_out, None
        if not data or self._closed:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    async def drain(self) -> None:
        if self._paused_writing and not self._closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
            self._drain_waiter = None

    def pause_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def close(self) -> None:
        """Flush what is pending, then close."""
        if not self._closed and self._transport is not None:
            self._send_plaintext()
            self._closed = True
            self._transport.close()

    def end_input(self) -> None:
        """Read nothing more from the client, as if it had closed its side: amqtt routes
        what the client sent before (the reader's end-of-stream wait) and ends the session.
        The broker's shutdown uses it so that nothing already acknowledged is dropped."""
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()
        if self.reader is not None:
            self.reader.feed_eof()

    def abort(self) -> None:
        """Drop the connection at once (revocation, protocol abuse, timeouts)."""
        if self.reader is not None:
            self.reader.discard_backlog = True
        if self._transport is not None and not self._transport.is_closing():
            self._closed = True
            self._transport.abort()
        elif self._transport is not None:
            self._closed = True

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._tls

    @property
    def is_closed(self) -> bool:
        return self._closed


class StreamReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no type hints
    """The plaintext side for amqtt: ``read(n)`` returns exactly ``n`` bytes or fewer at EOF."""

    __slots__ = (
        "_buffer",
        "_connection",
        "_eof",
        "_max_read",
        "_paused",
        "_waiter",
        "_wanted",
        "backlog",
        "discard_backlog",
    )

    def __init__(self, connection: TlsConnection, max_read: int) -> None:
        self._connection = connection
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._max_read = max_read
        self._paused = False
        #: Number of this client's messages amqtt has accepted but not yet routed.
        self.backlog: Callable[[], int] | None = None
        #: Set when the session is dropped (revocation): no waiting for its backlog at EOF.
        self.discard_backlog = False

    def feed_data(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _READ_HIGH_WATER and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the buffer (the CONNECT the gate already read)."""
        self._buffer[:0] = data

    def _wake(self) -> None:
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and (self._eof or len(self._buffer) >= self._wanted)
        ):
            waiter.set_result(None)

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._max_read
        if n > self._max_read:
            # amqtt reads a packet body in one call: refuse before buffering it.
            self._connection.abort()
            raise PacketTooLargeError(f"packet of {n} bytes exceeds {self._max_read}")
        if self.backlog is not None and self.backlog() > _BACKLOG_HIGH:
            await self._wait_for_backlog(_BACKLOG_LOW, deadline=None)
        while len(self._buffer) < n and not self._eof:
            self._wanted = n
            if self._paused:
                self._paused = False
                self._connection.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._buffer) < n and self.backlog is not None and not self.discard_backlog:
            loop = asyncio.get_running_loop()
            await self._wait_for_backlog(0, deadline=loop.time() + _EOF_DRAIN_S)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        if self._paused and len(self._buffer) < _READ_HIGH_WATER // 2:
            self._paused = False
            self._connection.resume_reading()
        return data

    async def _wait_for_backlog(self, low: int, deadline: float | None) -> None:
        backlog = self.backlog
        assert backlog is not None
        loop = asyncio.get_running_loop()
        while backlog() > low and not self.discard_backlog:
            if deadline is not None and loop.time() > deadline:
                return
            await asyncio.sleep(_BACKLOG_POLL_S)


class StreamWriter(WriterAdapter):  # type: ignore[misc]  # amqtt ships no type hints
    """The plaintext write side for amqtt."""

    __slots__ = ("_connection",)

    def __init__(self, connection: TlsConnection) -> None:
        self._connection = connection

    def write(self, data: bytes) -> None:
        self._connection.write(data)

    async def drain(self) -> None:
        await self._connection.drain()

    def get_peer_info(self) -> tuple[str, int] | None:
        return self._connection.peername

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return self._connection.ssl_object

    async def close(self) -> None:
        self._connection.close()
