"""Noticing a registry database restored from an older copy (issue 11.5, registry side).

The registry remembers, in its data folder (``registry-feed.json``), the feed epoch and the
highest sequence number it has handed out. At start, a database with the same epoch but a
lower head was restored from an older copy: the sequence numbers above its head were already
seen by brokers and would be handed out again for other devices. The registry then logs it
(``level=error``), counts it (``certfleet_registry_feed_restores``) and draws a new feed
epoch, so that every broker re-reads the feed from 0 (the broker also checks head < its
position). Decommissions made after the copy was taken are not in the restored database:
brokers keep enforcing them (their revoked set never shrinks), the CRL no longer lists them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session

from registry.store import revocations

__all__ = ["MARK_FILE", "FeedMark"]

log = logging.getLogger(__name__)

MARK_FILE = "registry-feed.json"


class FeedMark:
    """The feed's high-water mark in the data folder; :meth:`check` at start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._epoch = 0
        self._head = 0
        self._warned = False

    def check(self, engine: Engine) -> bool:
        """Compare the database with the mark; True (and a new epoch) when it went back."""
        with Session(engine) as session:
            epoch = revocations.feed_epoch(session)
            head = revocations.head_seq(session)
        mark = self._read()
        restored = mark is not None and mark[0] == epoch and head < mark[1]
        if restored:
            assert mark is not None
            with Session(engine) as session:
                new_epoch = revocations.redraw_feed_epoch(session)
            log.error(
                "registry database restored from an older copy: feed head %d is below %d "
                "handed out before; new feed epoch=%d (brokers re-read the feed from 0); "
                "decommissions after the copy are not in this database",
                head,
                mark[1],
                new_epoch,
            )
            epoch = new_epoch
        with self._lock:
            self._epoch, self._head = epoch, head
            self._write()
        return restored

    def advance(self, head: int) -> None:
        """Note that the feed reached ``head`` (after a decommission committed)."""
        with self._lock:
            if head <= self._head:
                return
            self._head = head
            self._write()

    def _read(self) -> tuple[int, int] | None:
        try:
            data = json.loads(self.path.read_text())
            return int(data["epoch"]), int(data["head_seq"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("feed mark unreadable path=%s error=%s; starting a new one", self.path, exc)
            return None

    def _write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps({"epoch": self._epoch, "head_seq": self._head}))
            os.replace(temporary, self.path)
            self._warned = False
        except OSError as exc:
            # Never stops a decommission: the broker's own check (head < position) remains.
            if not self._warned:
                log.warning("feed mark not written path=%s error=%s", self.path, exc)
                self._warned = True
