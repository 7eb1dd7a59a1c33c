"""Open a TLS connection without blocking the event loop.

paho's ``connect()`` performs the TCP connect and the TLS handshake synchronously; with
thousands of devices on one loop that would stall every other device for the duration of each
handshake. Here the handshake is stepped by the loop (``do_handshake`` on a non-blocking socket,
waiting for readability/writability in between), and paho is handed the finished socket.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

__all__ = ["open_tls"]


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def open_tls(
    host: str, port: int, context: ssl.SSLContext, *, server_hostname: str | None = None
) -> ssl.SSLSocket:
    """A connected, handshaken, non-blocking TLS socket. Raises OSError / ssl.SSLError.

    The caller bounds the time (``asyncio.timeout``); on any error the socket is closed.
    """
    loop = asyncio.get_running_loop()
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setblocking(False)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(raw, (host, port))
        tls = context.wrap_socket(
            raw, server_hostname=server_hostname or host, do_handshake_on_connect=False
        )
    except BaseException:
        raw.close()
        raise
    fd = tls.fileno()
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _wait_fd(loop, fd, write=False)
            except ssl.SSLWantWriteError:
                await _wait_fd(loop, fd, write=True)
    except BaseException:
        tls.close()
        raise
