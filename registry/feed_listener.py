"""Waking every replica's long-polls: PostgreSQL LISTEN on the feed's channel.

A decommission on PostgreSQL sends ``NOTIFY certfleet_feed`` in its own transaction
(:func:`registry.store.revocations.decommission_device`), so the notification goes out
exactly when the revocation commits. Each registry process keeps one connection of its own
(not from the pool) listening on that channel, on a supervised thread
(:class:`registry.supervise.SupervisedThread`); each notification wakes this process's
waiters (:meth:`registry.feed.FeedNotifier.published`), who then re-read the database.

Notifications sent while the connection is down are lost, so every (re)connect also wakes
the waiters: they re-check the database and miss nothing. The long-polls' periodic re-read
(``registry_feed_poll_seconds``) stays as the last safety net. Reconnects back off
(:data:`RECONNECT_BACKOFF_S`) and are counted; the connection's state is a gauge.
On SQLite (one process) the in-process notifier alone does the job, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import Engine

from registry.feed import FeedNotifier
from registry.metrics import RegistryMetrics
from registry.store.revocations import FEED_CHANNEL
from registry.supervise import SupervisedThread

__all__ = ["RECONNECT_BACKOFF_S", "FeedListener"]

log = logging.getLogger(__name__)

#: Waits before reconnecting: the next value after each failure, up to the last.
RECONNECT_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
#: How often the listening loop looks up from the socket to check for shutdown.
POLL_S = 0.5


class FeedListener:
    """One LISTEN connection per process; each notification wakes ``feed``'s waiters."""

    def __init__(
        self,
        engine: Engine,
        feed: FeedNotifier,
        metrics: RegistryMetrics,
        *,
        instance: str,
        connect_timeout_s: int = 5,
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        url = engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._shown_url = url.render_as_string(hide_password=True)
        self._feed = feed
        self._metrics = metrics
        self._application_name = f"certfleet-feed-listener/{instance}"[:63]
        self._connect_timeout_s = connect_timeout_s
        self._listened = False
        self.connected = threading.Event()
        self._thread = SupervisedThread("feed-listener", self._run, on_crash=on_crash)

    @property
    def thread(self) -> SupervisedThread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (within ``POLL_S``) and close the connection."""
        self._thread.stop()

    def _run(self, stopping: threading.Event) -> None:
        failures = 0
        while not stopping.is_set():
            try:
                self._listen(stopping)
                return
            except psycopg.Error as exc:
                if stopping.is_set():
                    return
                if self._listened:  # it worked until now: start the backoff over
                    failures, self._listened = 0, False
                wait = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                self._metrics.feed_listener_reconnects.inc()
                log.warning(
                    "feed listener lost its connection url=%s error=%s reconnect_in=%.2fs",
                    self._shown_url,
                    (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200],
                    wait,
                )
                stopping.wait(wait)

    def _listen(self, stopping: threading.Event) -> None:
        with psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            application_name=self._application_name,
            # TCP keepalives: a server that vanished without closing is noticed within ~20 s.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=2,
        ) as connection:
            connection.execute(f"LISTEN {FEED_CHANNEL}")
            self._listened = True
            try:
                self.connected.set()
                self._metrics.feed_listener_connected.set(1)
                log.info("feed listener listening channel=%s", FEED_CHANNEL)
                # Anything committed while we were not listening: waiters re-read now.
                self._feed.published()
                while not stopping.is_set():
                    for _notification in connection.notifies(timeout=POLL_S):
                        self._metrics.feed_notifications.inc()
                        self._feed.published()
                        if stopping.is_set():
                            break
            finally:
                self.connected.clear()
                self._metrics.feed_listener_connected.set(0)
