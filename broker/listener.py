"""The broker's mTLS listener: accept, handshake, admit, then hand over to amqtt.

amqtt is configured with a single listener of type ``external`` (its documented hook for
connections accepted elsewhere); this module owns the socket. For each connection:

1. TLS handshake with ``CERT_REQUIRED`` (:mod:`broker.tls`) under a deadline; a failure is
   counted by reason (no certificate, self-signed, unknown CA, expired, ...).
2. The first MQTT packet must be a CONNECT of MQTT 3.1.1, within a deadline (another
   protocol level is answered CONNACK 0x01). The :class:`AdmissionPolicy` decides from the
   peer certificate and the client id, and the will topic must pass the publish ACL
   (:func:`broker.acl.will_refusal`); a refusal is answered with its CONNACK code (0x05 not
   authorized, 0x02 identifier rejected), counted and closed *before amqtt sees the
   CONNECT*. This matters: amqtt deletes any existing session of a clean-session CONNECT's
   client id before it asks the auth plugins, so a device that claimed another device's id
   would otherwise wipe that device's subscriptions even though it is then refused.
3. Admitted: the CONNECT's client id is replaced by the identity's session key
   (:mod:`broker.sessions`: services and devices never share one), the connection is
   indexed by its certificate serial and device id (for live revocation), and the byte
   stream, CONNECT included, goes to ``Broker.external_connected``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from contextlib import suppress

from amqtt.adapters import BufferReader
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connect import ConnectPacket
from amqtt.session import Session

from broker.acl import RENEWAL_SERVICE, will_refusal
from broker.auth import (
    CONNACK_UNACCEPTABLE_PROTOCOL,
    Admission,
    AdmissionPolicy,
    Refusal,
    RefusedError,
)
from broker.connection import PacketTooLargeError, StreamReader, StreamWriter, TlsConnection
from broker.metrics import BrokerMetrics
from broker.sessions import identity_of_key
from fleetcore.profile import Identity, IdentityKind

__all__ = ["LISTENER_NAME", "MqttTlsListener", "classify_handshake_error"]

log = logging.getLogger(__name__)

#: Name of the amqtt listener (type ``external``) the connections are handed to.
LISTENER_NAME = "default"

_CONNECT = 1
#: The one protocol level amqtt speaks: MQTT 3.1.1 ("MQTT", level 4).
_MQTT_311 = ("MQTT", 4)


def _connack(code: int) -> bytes:
    return bytes((0x20, 0x02, 0x00, code))


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


async def _read_packet(reader: StreamReader, max_bytes: int) -> bytes:
    """One whole MQTT packet (fixed header included) as bytes."""
    header = bytearray(await reader.read(1))
    if not header:
        raise NoDataError("connection closed before the first packet")
    length, multiplier = 0, 1
    for _ in range(4):
        byte = await reader.read(1)
        if not byte:
            raise NoDataError("connection closed inside a packet header")
        header += byte
        length += (byte[0] & 0x7F) * multiplier
        if not byte[0] & 0x80:
            break
        multiplier *= 128
    else:
        raise MQTTError("malformed remaining length")
    if length > max_bytes:
        raise PacketTooLargeError(f"first packet of {length} bytes exceeds {max_bytes}")
    body = await reader.read(length) if length else b""
    if len(body) < length:
        raise NoDataError("connection closed inside the first packet")
    return bytes(header) + body


def _protocol(packet: bytes) -> tuple[str, int]:
    """Protocol name and level of a raw CONNECT, read before anything else is parsed (an
    MQTT 5 CONNECT carries properties that amqtt's 3.1.1 parser would misread)."""
    offset = 1
    while packet[offset] & 0x80:
        offset += 1
    offset += 1
    name_length = int.from_bytes(packet[offset : offset + 2], "big")
    name_end = offset + 2 + name_length
    if name_length > 6 or name_end >= len(packet):
        raise MQTTError("CONNECT protocol name is malformed")
    return packet[offset + 2 : name_end].decode("ascii", "replace"), packet[name_end]


class MqttTlsListener:
    """Accepts mTLS clients for one amqtt :class:`Broker`."""

    def __init__(
        self,
        *,
        broker: Broker,
        ssl_context: ssl.SSLContext,
        policy: AdmissionPolicy,
        metrics: BrokerMetrics,
        handshake_timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        max_packet_bytes: int = 256 * 1024,
        renewal_service: str = RENEWAL_SERVICE,
    ) -> None:
        self.broker = broker
        self.ssl_context = ssl_context
        self.policy = policy
        self.metrics = metrics
        self.handshake_timeout_s = handshake_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_packet_bytes = max_packet_bytes
        self.renewal_service = renewal_service
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitted: dict[TlsConnection, Admission] = {}
        self._by_serial: dict[str, set[TlsConnection]] = {}
        self._by_device: dict[str, set[TlsConnection]] = {}
        #: The live connection of each session key: a new one takes the session over.
        self._by_key: dict[str, TlsConnection] = {}
        #: Admitted connections whose amqtt session is not yet authenticated, by session key
        #: (oldest first: amqtt reaches its auth plugin in the order connections arrive).
        self._awaiting_session: dict[str, list[TlsConnection]] = {}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0 = ephemeral); return the bound port. ``reuse_port``:
        SO_REUSEPORT, so several broker processes share the port (the kernel spreads
        connections over them)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: TlsConnection(self),
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=4096,
        )
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._admitted):
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            self._server = None

    # -- callbacks from TlsConnection -----------------------------------------------------

    def connection_opened(self, connection: TlsConnection) -> None:
        self.metrics.tls_connections.inc()

    def connection_closed(self, connection: TlsConnection) -> None:
        # The admission stays until amqtt has finished with the session (see _serve): amqtt
        # may still be routing the last messages the client sent before it closed.
        self.metrics.tls_connections.dec()

    def handshake_failed(self, connection: TlsConnection, exc: ssl.SSLError) -> None:
        reason = classify_handshake_error(exc)
        self._refused(connection, reason, f"tls: {exc.reason or exc}")

    def handshake_timed_out(self, connection: TlsConnection) -> None:
        self._refused(
            connection, Refusal.HANDSHAKE_TIMEOUT, f"no handshake in {self.handshake_timeout_s}s"
        )

    def handshake_completed(self, connection: TlsConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_guarded(connection))
        self._tasks.add(task)
        task.add_done_callback(self._connection_task_done)

    def _connection_task_done(self, task: asyncio.Task[None]) -> None:
        """A connection's task ended: an unexpected error is logged and counted, not lost."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.metrics.connection_errors.inc()
        log.error("connection task failed error=%s", f"{type(exc).__name__}: {exc}"[:300])

    def claim_session(self, session: Session) -> bytes | None:
        """amqtt's auth plugin asks for a session: the certificate of the connection the
        gate admitted for its key (None: not through the gate). The connection's reader
        gets the session's backlog, and the connection takes the keep-alive over."""
        if session.client_id is None:
            return None
        waiting = self._awaiting_session.get(session.client_id)
        if not waiting:
            return None
        connection = waiting.pop(0)
        if not waiting:
            del self._awaiting_session[session.client_id]
        if connection.reader is not None:
            connection.reader.backlog = session.delivered_message_queue.qsize
            # The connection enforces the keep-alive; amqtt would otherwise wrap every packet
            # read in asyncio.wait_for (a task each) and re-arm a timer per packet sent.
            connection.enforce_keepalive(session.keep_alive)
            session.keep_alive = 0
        return connection.peer_certificate_der

    def keepalive_expired(self, connection: TlsConnection) -> None:
        admission = self._admitted.get(connection)
        log.info(
            "session dropped reason=keepalive client_id=%s",
            admission.identity.name if admission else "?",
        )

    # -- the ACL's view -------------------------------------------------------------------

    def identity_of(self, client_id: str) -> Identity | None:
        """The identity of an amqtt session (connected or not) from its key."""
        return identity_of_key(client_id, self.policy.trust_domain)

    def count_acl_refusal(self, action: Action) -> None:
        self.metrics.acl_refusals.labels(action.value).inc()

    def count_acl_allowed(self, action: Action) -> None:
        if action is Action.PUBLISH:
            self.metrics.messages_in.inc()
        elif action is Action.RECEIVE:
            self.metrics.messages_out.inc()

    # -- revocation -----------------------------------------------------------------------

    def drop(self, serials: list[str], device_id: str | None = None) -> int:
        """Disconnect at once every session that authenticated with one of ``serials`` (or,
        for a decommissioned device, any of its certificates). Returns how many."""
        victims: set[TlsConnection] = set()
        for serial in serials:
            victims |= self._by_serial.get(serial, set())
        if device_id is not None:
            victims |= {
                c
                for c in self._by_device.get(device_id, set())
                if self._admitted[c].identity.kind is IdentityKind.DEVICE
            }
        for connection in victims:
            admission = self._admitted.get(connection)
            connection.abort()
            self.metrics.sessions_dropped.inc()
            if admission is not None:
                log.info(
                    "session dropped reason=revoked client_id=%s serial=%s",
                    admission.identity.name,
                    admission.serial,
                )
        return len(victims)

    def close_session(self, key: str) -> bool:
        """Close the live connection of a session key (taken over on another node)."""
        connection = self._by_key.get(key)
        if connection is None or connection.is_closed:
            return False
        connection.abort()
        return True

    @property
    def admitted_count(self) -> int:
        return len(self._admitted)

    # -- per connection -------------------------------------------------------------------

    def _refused(self, connection: TlsConnection, reason: Refusal, detail: str) -> None:
        self.metrics.refusals.labels(reason.value).inc()
        peer = connection.peername
        log.info(
            "client refused reason=%s peer=%s:%s %s",
            reason.value,
            peer[0] if peer else "?",
            peer[1] if peer else "?",
            detail,
        )

    async def _serve_guarded(self, connection: TlsConnection) -> None:
        """:meth:`_serve`, closing the socket on an unexpected error (then logged and counted
        by :meth:`_connection_task_done`) instead of leaving the client hanging."""
        try:
            await self._serve(connection)
        except Exception:
            connection.abort()
            raise

    async def _serve(self, connection: TlsConnection) -> None:
        reader = connection.reader
        assert reader is not None and connection.peer_certificate_der is not None
        try:
            packet = await asyncio.wait_for(
                _read_packet(reader, self.max_packet_bytes), self.connect_timeout_s
            )
            if packet[0] >> 4 != _CONNECT:
                raise MQTTError(f"first packet has type {packet[0] >> 4}, not CONNECT")
            protocol = _protocol(packet)
            if protocol != _MQTT_311:
                raise RefusedError(
                    Refusal.UNSUPPORTED_PROTOCOL,
                    f"protocol {protocol[0]!r} level {protocol[1]}: only MQTT 3.1.1 (level 4)",
                    connack=CONNACK_UNACCEPTABLE_PROTOCOL,
                )
            connect = await ConnectPacket.from_stream(BufferReader(packet))
            if connect.payload is None or connect.variable_header is None:
                raise MQTTError("CONNECT without payload")
        except TimeoutError:
            self._refused(connection, Refusal.CONNECT_TIMEOUT, "no CONNECT in time")
            connection.abort()
            return
        except NoDataError:
            connection.close()
            return
        except RefusedError as exc:
            self._refuse_connect(connection, exc)
            return
        except (MQTTError, AMQTTError, PacketTooLargeError, ValueError, IndexError) as exc:
            self._refused(connection, Refusal.BAD_CONNECT, str(exc)[:200])
            connection.abort()
            return
        try:
            admission = self._admit(connection.peer_certificate_der, connect)
        except RefusedError as exc:
            self._refuse_connect(connection, exc)
            return
        if connection.is_closed:
            return
        key = admission.session_key
        if connect.payload.client_id != key or connect.payload.client_id_is_random:
            connect.payload.client_id = key
            connect.payload.client_id_is_random = False
            packet = bytes(connect.to_bytes())
        self._remember(connection, admission)
        reader.unread(packet)
        self._awaiting_session.setdefault(key, []).append(connection)
        self.metrics.admitted.inc()
        self.metrics.connections.inc()
        log.debug(
            "client admitted client_id=%s serial=%s", admission.identity.name, admission.serial
        )
        try:
            await self.broker.external_connected(reader, StreamWriter(connection), LISTENER_NAME)
        except (AMQTTError, MQTTError, NoDataError, ConnectionError) as exc:
            log.info(
                "session ended client_id=%s error=%s", admission.identity.name, type(exc).__name__
            )
        finally:
            waiting = self._awaiting_session.get(key)
            if waiting is not None and connection in waiting:
                waiting.remove(connection)
                if not waiting:
                    del self._awaiting_session[key]
            self.metrics.connections.dec()
            self._forget(connection)
            connection.close()

    def _admit(self, certificate_der: bytes, connect: ConnectPacket) -> Admission:
        """The gate's decision on a parsed CONNECT: identity, client id, revocation, will."""
        payload, header = connect.payload, connect.variable_header
        assert payload is not None and header is not None
        client_id = None if payload.client_id_is_random else payload.client_id
        admission = self.policy.admit(
            certificate_der, client_id, clean_session=header.clean_session_flag
        )
        if header.will_flag:
            why = will_refusal(
                admission.identity,
                payload.will_topic or "",
                retain=header.will_retain_flag,
                renewal_service=self.renewal_service,
            )
            if why is not None:
                detail = f"client_id={admission.identity.name} {why}"
                raise RefusedError(Refusal.WILL_REFUSED, detail)
        return admission

    def _refuse_connect(self, connection: TlsConnection, exc: RefusedError) -> None:
        self._refused(connection, exc.reason, exc.detail)
        connection.write(_connack(exc.connack))
        connection.close()

    def _remember(self, connection: TlsConnection, admission: Admission) -> None:
        key = admission.session_key
        previous = self._by_key.get(key)
        if previous is not None and not previous.is_closed:
            # [MQTT-3.1.4-2]: the server disconnects the client already using this id.
            # amqtt does not (for a clean-session CONNECT it only deletes the old session).
            log.info("session taken over client_id=%s", admission.identity.name)
            previous.abort()
        self._by_key[key] = connection
        self._admitted[connection] = admission
        self._by_serial.setdefault(admission.serial, set()).add(connection)
        self._by_device.setdefault(admission.identity.name, set()).add(connection)

    def _forget(self, connection: TlsConnection) -> None:
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
