"""Real paho clients over mTLS, with what they saw (connects, refusals, messages)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.pki import ClientFiles


@dataclass
class MqttProbe:
    """A real paho client on its own network thread, with what it saw."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    #: (topic, payload, qos, retain) of every message, for tests that look at flags.
    received: list[tuple[str, bytes, int, bool]] = field(default_factory=list)
    session_present: bool | None = None
    suback: list[int] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def freeze(self) -> None:
        """Go silent with the socket open (a half-open connection: no PINGREQ any more)."""
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (the broker then publishes the will)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def connect(
    port: int,
    files: ClientFiles | tuple[Path | None, Path | None],
    client_id: str,
    *,
    root: Path | None = None,
    timeout: float = 10.0,
    clean_session: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
    keepalive: int = 30,
    max_inflight: int = 20,
    manual_ack: bool = False,
) -> MqttProbe:
    """Connect a paho client over mTLS; returns the probe once connected, refused or failed.

    ``will`` is (topic, payload, qos, retain); ``max_inflight`` is paho's window of
    unacknowledged QoS 1/2 messages (its default 20); ``manual_ack`` keeps paho from
    acknowledging what it receives (a client that leaves before its PUBACK).
    """
    cert, key = (files.cert, files.key) if isinstance(files, ClientFiles) else files
    ca_file = root or (files.root if isinstance(files, ClientFiles) else None)
    if protocol is mqtt.MQTTv5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=protocol,
        )
    if will is not None:
        client.will_set(will[0], will[1], qos=will[2], retain=will[3])
    client.tls_set(
        ca_certs=str(ca_file),
        certfile=str(cert) if cert else None,
        keyfile=str(key) if key else None,
    )
    client.reconnect_delay_set(60, 120)  # never reconnect inside a test
    client.max_inflight_messages_set(max_inflight)
    client.manual_ack_set(manual_ack)
    probe = MqttProbe(client)

    def on_connect(_c: mqtt.Client, _u: object, flags: object, rc: object, _p: object) -> None:
        probe.reason = str(rc)
        probe.session_present = bool(getattr(flags, "session_present", False))
        if not getattr(rc, "is_failure", True):
            probe.connected.set()
        else:
            probe.disconnected.set()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        probe.reason = probe.reason or str(rc)
        probe.disconnected.set()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        probe.messages.append((message.topic, message.payload))
        probe.received.append((message.topic, message.payload, message.qos, message.retain))

    def on_subscribe(
        _c: mqtt.Client, _u: object, _mid: int, codes: list[object], _p: object
    ) -> None:
        probe.suback = [int(getattr(code, "value", code)) for code in codes]  # type: ignore[call-overload]
        probe.subscribed.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    try:
        client.connect("127.0.0.1", port, keepalive=keepalive)
    except OSError as exc:  # TLS 1.2 refusals surface here
        probe.reason = f"{type(exc).__name__}: {exc}"
        probe.disconnected.set()
        return probe
    client.loop_start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe.connected.is_set() or probe.disconnected.is_set():
            break
        time.sleep(0.01)
    return probe


def subscribed(probe: MqttProbe, topic_filter: str, qos: int = 1) -> MqttProbe:
    """``probe`` (connected) once the broker granted its SUBSCRIBE to ``topic_filter``."""
    assert probe.connected.is_set(), probe.reason
    probe.subscribed.clear()
    probe.client.subscribe(topic_filter, qos=qos)
    assert probe.subscribed.wait(5)
    assert probe.suback == [qos], probe.suback
    return probe


def payloads(*probes: MqttProbe) -> list[bytes]:
    """Every payload the probes received so far, probe by probe, in arrival order."""
    return [payload for probe in probes for _topic, payload in list(probe.messages)]
