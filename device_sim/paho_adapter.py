"""The one place certfleet relies on paho-mqtt internals (paho 2.x).

paho has no public way to hand a client a connection that is already open: ``connect()`` and
``reconnect()`` open the TCP connection and run the TLS handshake synchronously inside the
private ``Client._create_socket()``. With thousands of devices on one event loop that would
stall every device for each handshake, so the simulator steps the handshake on the loop
(:func:`device_sim.transport.open_tls`) and overrides that one method to return the finished
socket. Everything else is paho's public API, as aiomqtt uses it: ``connect_async`` +
``reconnect`` (which sends CONNECT on our socket), the socket callbacks ``on_socket_open`` /
``on_socket_close`` / ``on_socket_register_write`` / ``on_socket_unregister_write``, and
``loop_read`` / ``loop_write`` / ``loop_misc``.

paho also swallows the exception of a failed socket read or write (it logs it and reports
only "connection lost"); the reason matters here (a TLS 1.3 server refuses a client
certificate with an alert that arrives on the first read). :class:`DeviceSocket` is our own
socket object, handed to paho, which remembers that exception: no paho internals needed.

What is relied on, pinned by ``tests/device_sim/test_paho_adapter.py`` so that a paho upgrade
that changes it fails loudly:

- ``reconnect()`` takes its socket from ``_create_socket()`` (no arguments), sets it
  non-blocking, passes it to ``on_socket_open`` and writes CONNECT on it, never opening a
  connection of its own;
- paho reads and writes only through that object's ``recv`` / ``send``, turning
  ``ssl.SSLWantReadError`` / ``SSLWantWriteError`` into "try again";
- when a read fails, paho calls ``on_socket_close`` and then ``on_disconnect``.
"""

from __future__ import annotations

import inspect
import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["DeviceSocket", "PreparedSocketClient"]


def _check_private_hook() -> None:
    hook = getattr(mqtt.Client, "_create_socket", None)
    if hook is None or list(inspect.signature(hook).parameters) != ["self"]:
        raise ImportError(
            "paho-mqtt no longer has Client._create_socket(self), which device_sim overrides "
            "to hand paho a socket handshaken on the event loop: pin paho-mqtt to a 2.x "
            "release that has it, or rework device_sim/paho_adapter.py"
        )


_check_private_hook()

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class DeviceSocket:
    """A non-blocking TLS socket as paho sees it, remembering why it failed.

    ``error`` holds the first TLS or connection error a read or write raised (paho itself
    reports only "connection lost"); "try again" conditions are not errors. Closing twice is
    harmless.
    """

    __slots__ = ("error", "tls")

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self.error: OSError | None = None

    def recv(self, buffer_size: int) -> bytes:
        try:
            return self.tls.recv(buffer_size)
        except _WANT:
            raise
        except (ssl.SSLError, ConnectionError) as exc:
            self.error = self.error or exc
            raise

    def send(self, buffer: bytes | bytearray) -> int:
        try:
            return self.tls.send(buffer)
        except _WANT:
            raise
        except (ssl.SSLError, ConnectionError) as exc:
            self.error = self.error or exc
            raise

    def pending(self) -> int:
        """Decrypted bytes TLS holds that the kernel no longer reports as readable."""
        return self.tls.pending()

    def fileno(self) -> int:
        return self.tls.fileno()

    def setblocking(self, flag: bool) -> None:
        self.tls.setblocking(flag)

    def close(self) -> None:
        self.tls.close()


class PreparedSocketClient(mqtt.Client):
    """A paho client (MQTT 3.1.1, clean session) that connects over a socket it is given.

    Call ``connect_async(host, port, keepalive)`` then ``reconnect()``: paho sends CONNECT on
    ``sock`` and the session proceeds through the public loop and callback API. A client
    serves one connection; a second ``reconnect()`` raises ConnectionError.
    """

    def __init__(self, client_id: str, sock: DeviceSocket) -> None:
        super().__init__(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        self._prepared: DeviceSocket | None = sock

    # The private hook (see the module docstring): paho calls it from reconnect().
    def _create_socket(self) -> DeviceSocket:
        sock, self._prepared = self._prepared, None
        if sock is None:
            raise ConnectionError("this client's socket was used already: open a new one")
        return sock
