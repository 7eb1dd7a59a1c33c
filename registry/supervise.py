"""Supervised background threads: a body that raises is logged, counted and restarted.

Every background loop of the registry (CRL signer, renewal worker, telemetry flusher,
subscription watchdog) runs under :class:`SupervisedThread`, so none can die silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["SupervisedThread"]

log = logging.getLogger(__name__)

#: Waits between restarts: doubled after each crash, up to the last value.
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class SupervisedThread:
    """Run ``body(stopping)`` on a daemon thread until ``stopping`` is set.

    ``body`` returns when ``stopping`` is set. If it raises (or returns early), the crash
    is logged with its traceback, reported through ``on_crash(name)`` (a metric) and the body
    is started again after a backoff.
    """

    def __init__(
        self,
        name: str,
        body: Callable[[threading.Event], None],
        *,
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self._body = body
        self._on_crash = on_crash
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.crashes = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (again a no-op while it runs)."""
        with self._lock:
            if self.alive or self._stopping.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name=f"certfleet-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        backoff = 0
        while not self._stopping.is_set():
            try:
                self._body(self._stopping)
                if self._stopping.is_set():
                    return
                raise RuntimeError("background task returned while not stopping")
            except Exception:
                self.crashes += 1
                log.exception(
                    "background task crashed task=%s crashes=%d restart_in=%.1fs",
                    self.name,
                    self.crashes,
                    RESTART_BACKOFF_S[backoff],
                )
                if self._on_crash is not None:
                    try:
                        self._on_crash(self.name)
                    except Exception:  # a failing metric must not stop the restart
                        log.exception("crash report failed task=%s", self.name)
                self._stopping.wait(RESTART_BACKOFF_S[backoff])
                backoff = min(backoff + 1, len(RESTART_BACKOFF_S) - 1)
