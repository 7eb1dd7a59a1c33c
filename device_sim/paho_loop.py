"""paho on asyncio: one client's socket driven by the running event loop, never by paho threads.

A :class:`PahoOnLoop` holds the connection of one device at a time: the prepared paho client
(:class:`device_sim.paho_adapter.PreparedSocketClient`) and our own socket object
(:class:`device_sim.paho_adapter.DeviceSocket`). paho's socket callbacks register the socket's
descriptor with the loop (``add_reader``/``add_writer``); the loop then calls
``loop_read``/``loop_write`` when the socket is ready. :meth:`PahoOnLoop.close` drops the
connection at once (no DISCONNECT): the socket is ours, we close it.

The device (:mod:`device_sim.device`) owns the MQTT side (CONNECT, publishes, acks); this
module owns only the plumbing between paho and the loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from device_sim.paho_adapter import DeviceSocket, PreparedSocketClient

log = logging.getLogger(__name__)

#: Reads per readiness callback while TLS holds decrypted bytes the kernel no longer reports.
_MAX_READ_ROUNDS = 64


class PahoOnLoop:
    """The current paho client of one device and its socket, driven by the running loop."""

    def __init__(self, name: str) -> None:
        self.name = name  # for logs: the device id
        self.client: PreparedSocketClient | None = None
        self.socket: DeviceSocket | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, client: PreparedSocketClient, sock: DeviceSocket) -> None:
        """Make ``client`` (on ``sock``) the current connection; call from the running loop
        before the client sends CONNECT (its socket callbacks register the descriptor)."""
        self._loop = asyncio.get_running_loop()
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        self.client = client
        self.socket = sock

    def close(self) -> bool:
        """Drop the current connection at once (no DISCONNECT) and close its socket; whether
        there was one."""
        client, self.client = self.client, None
        sock, self.socket = self.socket, None
        if client is None:
            return False
        self._unregister_fd()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                log.debug("socket close failed device_id=%s", self.name)
        return True

    # -- paho's socket callbacks ----------------------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if client is self.client:  # not a dropped client being garbage-collected
            self._unregister_fd()

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if client is self.client and self._fd >= 0 and self._loop is not None:
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if client is self.client and self._fd >= 0 and self._loop is not None:
            self._loop.remove_writer(self._fd)

    # -- the loop's readiness callbacks ---------------------------------------------------

    def _on_readable(self) -> None:
        client, sock = self.client, self.socket
        if client is None or sock is None:
            return
        # TLS may hold decrypted bytes the kernel no longer reports as readable: keep reading
        # while the TLS layer has some (bounded).
        for _ in range(_MAX_READ_ROUNDS):
            if client.loop_read(max_packets=64) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if self.client is not client or sock.pending() == 0:
                return

    def _on_writable(self) -> None:
        client = self.client
        if client is not None:
            client.loop_write()

    def _unregister_fd(self) -> None:
        if self._fd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = -1
