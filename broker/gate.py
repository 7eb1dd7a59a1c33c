"""The CONNECT gate: the first packet of every TLS connection, decided before amqtt sees it.

After the handshake (:mod:`broker.connection`), :meth:`ConnectGate.admit` reads one packet
under a deadline. It must be a CONNECT of MQTT 3.1.1 (another protocol level is answered
CONNACK 0x01). The :class:`~broker.auth.AdmissionPolicy` decides from the peer certificate
and the client id, and a will must pass the publish ACL (:func:`broker.acl.will_refusal`). A
refusal is answered with its CONNACK code (0x05 not authorized, 0x02 identifier rejected),
counted, logged and closed **before amqtt sees the CONNECT**: amqtt deletes any existing
session of a clean-session CONNECT's client id before it asks its auth plugins, so a device
claiming another device's id would otherwise wipe that device's subscriptions.

Admitted, the CONNECT's client id is replaced by the identity's session key
(:mod:`broker.sessions`), the packet is put back in front of the connection's reader, and the
connection waits for amqtt to authenticate its session: :meth:`ConnectGate.claim` hands the
connection over (oldest first per key, the order amqtt reaches its auth plugin).

:meth:`ConnectGate.refused` is the one place a refusal (TLS or CONNECT) is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging

from amqtt.adapters import BufferReader
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connect import ConnectPacket

from broker.acl import RENEWAL_SERVICE, will_refusal
from broker.auth import (
    CONNACK_UNACCEPTABLE_PROTOCOL,
    Admission,
    AdmissionPolicy,
    Refusal,
    RefusedError,
)
from broker.connection import PacketTooLargeError, StreamReader, TlsConnection
from broker.metrics import BrokerMetrics

__all__ = ["ConnectGate"]

log = logging.getLogger(__name__)

_CONNECT = 1
#: The one protocol level amqtt speaks: MQTT 3.1.1 ("MQTT", level 4).
_MQTT_311 = ("MQTT", 4)


def _connack(code: int) -> bytes:
    return bytes((0x20, 0x02, 0x00, code))


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


class ConnectGate:
    """Admit or refuse the CONNECT of each connection; hand admitted ones to amqtt."""

    def __init__(
        self,
        policy: AdmissionPolicy,
        metrics: BrokerMetrics,
        *,
        connect_timeout_s: float = 10.0,
        max_packet_bytes: int = 256 * 1024,
        renewal_service: str = RENEWAL_SERVICE,
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self.connect_timeout_s = connect_timeout_s
        self.max_packet_bytes = max_packet_bytes
        self.renewal_service = renewal_service
        #: Admitted connections whose amqtt session is not yet authenticated, by session key
        #: (oldest first: amqtt reaches its auth plugin in the order connections arrive).
        self._awaiting_session: dict[str, list[TlsConnection]] = {}

    def refused(self, connection: TlsConnection, reason: Refusal, detail: str) -> None:
        """Count and log one refused client (in the handshake or at CONNECT)."""
        self.metrics.refusals.labels(reason.value).inc()
        peer = connection.peername
        log.info(
            "client refused reason=%s peer=%s:%s %s",
            reason.value,
            peer[0] if peer else "?",
            peer[1] if peer else "?",
            detail,
        )

    async def admit(self, connection: TlsConnection) -> Admission | None:
        """Read and decide the connection's CONNECT. Admitted: the (rewritten) CONNECT is
        back in the reader and the connection awaits :meth:`claim`. Refused or gone: the
        connection is answered and closed, and None is returned."""
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
            self.refused(connection, Refusal.CONNECT_TIMEOUT, "no CONNECT in time")
            connection.abort()
            return None
        except NoDataError:
            connection.close()
            return None
        except RefusedError as exc:
            self._refuse_connect(connection, exc)
            return None
        except (MQTTError, AMQTTError, PacketTooLargeError, ValueError, IndexError) as exc:
            self.refused(connection, Refusal.BAD_CONNECT, str(exc)[:200])
            connection.abort()
            return None
        try:
            admission = self._decide(connection.peer_certificate_der, connect)
        except RefusedError as exc:
            self._refuse_connect(connection, exc)
            return None
        if connection.is_closed:
            return None
        key = admission.session_key
        if connect.payload.client_id != key or connect.payload.client_id_is_random:
            connect.payload.client_id = key
            connect.payload.client_id_is_random = False
            packet = bytes(connect.to_bytes())
        reader.unread(packet)
        self._awaiting_session.setdefault(key, []).append(connection)
        self.metrics.admitted.inc()
        log.debug(
            "client admitted client_id=%s serial=%s", admission.identity.name, admission.serial
        )
        return admission

    def claim(self, session_key: str | None) -> TlsConnection | None:
        """The admitted connection amqtt is now authenticating a session for (oldest first
        for its key); None when no connection came through the gate for that key."""
        if session_key is None:
            return None
        waiting = self._awaiting_session.get(session_key)
        if not waiting:
            return None
        connection = waiting.pop(0)
        if not waiting:
            del self._awaiting_session[session_key]
        return connection

    def withdraw(self, session_key: str, connection: TlsConnection) -> None:
        """Forget an admitted connection amqtt never claimed (it ended before)."""
        waiting = self._awaiting_session.get(session_key)
        if waiting is not None and connection in waiting:
            waiting.remove(connection)
            if not waiting:
                del self._awaiting_session[session_key]

    def recheck(self, certificate_der: bytes, session_key: str | None) -> bool:
        """The policy asked again, for amqtt's auth plugin (defence in depth)."""
        try:
            self.policy.admit(certificate_der, session_key)
        except RefusedError as exc:
            log.warning("client refused by auth plugin reason=%s %s", exc.reason, exc.detail)
            return False
        return True

    def _decide(self, certificate_der: bytes, connect: ConnectPacket) -> Admission:
        """The decision on a parsed CONNECT: identity, client id, revocation, will."""
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
        self.refused(connection, exc.reason, exc.detail)
        connection.write(_connack(exc.connack))
        connection.close()
