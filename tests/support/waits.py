"""Bounded waits: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, poll: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds (bounded); its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def waited(predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> float | None:
    """Seconds until ``predicate`` held, or None when it did not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(poll)
    return None


def must_wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for ``check``; fail the test naming ``what`` when it does not hold in time."""
    assert wait_for(check, timeout, poll=0.05), f"timed out waiting for {what}"


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """The asyncio form of :func:`wait_for`: raises TimeoutError when ``timeout`` passes."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    return True


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until ``process`` accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")
