"""The CRL the registry serves: signed by the issuing CA, cached, re-signed in one place.

One signer thread (:class:`CrlCache`) re-signs the CRL. A decommission only *requests* a
re-sign (:meth:`CrlCache.request_resign`, no wait, no database connection); requests that
arrive while the signer works are merged into its next run, so a burst of 200 decommissions
costs a handful of signatures, not 200 and no queue of waiting threads. A reader of the CRL
(:meth:`CrlCache.current`) that finds it older than the feed's head asks for a re-sign and
waits, bounded, for the signer. The CRL is also re-signed when half of its validity has
passed, and when its first entry expires (``not_after`` + ``CLOCK_SKEW``): an expired
certificate cannot be presented, so its entry leaves the CRL. CRLNumber comes from a
database counter, allocated in the transaction that reads the CRL's entries, so it only ever
grows, also across registry replicas sharing the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlmodel import Session

from factory.ca import CertificateAuthority
from fleetcore.clock import utcnow
from registry.errors import UnavailableError
from registry.store import certificates, revocations
from registry.supervise import SupervisedThread

__all__ = ["CrlCache", "SignedCrl"]

log = logging.getLogger(__name__)

#: How long a CRL reader waits for the signer before answering 503.
CRL_WAIT_S = 10.0
#: Wait after a failed signing (database down) before the signer tries again.
RETRY_AFTER_FAILURE_S = 1.0
#: A re-sign nobody waits for starts at least this long after the previous one: in a burst
#: of decommissions the signer otherwise signs back to back, each CRL listing every revoked
#: certificate (a sixth of a loaded registry's CPU). A reader of the CRL never waits for it.
RESIGN_SPACING_S = 0.25


@dataclass(frozen=True, slots=True)
class SignedCrl:
    pem: bytes
    der: bytes
    crl_number: int
    head_seq: int
    this_update: dt.datetime
    entries: int
    #: when the first entry leaves the CRL (its not_after + CLOCK_SKEW): re-signed then.
    next_expiry: dt.datetime | None = None


class CrlCache:
    """Holds the current signed CRL and the one thread that signs it."""

    def __init__(
        self,
        ca: CertificateAuthority,
        engine: Engine,
        *,
        next_update: dt.timedelta = dt.timedelta(hours=24),
        on_resign: Callable[[], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        on_crash: Callable[[str], None] | None = None,
        wait_seconds: float = CRL_WAIT_S,
    ) -> None:
        self._ca = ca
        self._engine = engine
        self._next_update = next_update
        self._on_resign = on_resign
        self._on_failure = on_failure
        self._wait_seconds = wait_seconds
        self._cond = threading.Condition()
        self._crl: SignedCrl | None = None
        self._requested = False
        self._readers = 0  # threads in current() waiting for the signer
        self._last_built = 0.0  # time.monotonic() when the last CRL was built
        self._failures = 0
        self._signer = SupervisedThread("crl-signer", self._run, on_crash=on_crash)

    @property
    def signer(self) -> SupervisedThread:
        return self._signer

    def request_resign(self) -> None:
        """Ask the signer for a CRL as of the current head; returns at once."""
        with self._cond:
            self._requested = True
            self._cond.notify_all()
        self._signer.start()

    def current(self) -> SignedCrl:
        """The CRL as of the feed's current head (waiting for the signer if that moved).

        Raises UnavailableError (503) when the signer cannot produce it in time.
        """
        with Session(self._engine) as session:
            head = revocations.head_seq(session)
        with self._cond:
            if self._fresh(head):
                assert self._crl is not None
                return self._crl
            self._requested = True
            self._readers += 1
            self._cond.notify_all()
        try:
            self._signer.start()
            with self._cond:
                self._cond.wait_for(lambda: self._fresh(head), self._wait_seconds)
        finally:
            with self._cond:
                self._readers -= 1
        with self._cond:
            if not self._fresh(head):
                raise UnavailableError(
                    "the CRL could not be signed in time (is the database reachable?); retry"
                )
            assert self._crl is not None
            return self._crl

    def close(self) -> None:
        self._signer.stop(0)
        with self._cond:
            self._cond.notify_all()
        self._signer.stop()

    def _fresh(self, head: int) -> bool:
        crl = self._crl
        return crl is not None and crl.head_seq >= head and utcnow() < self._due_at(crl)

    def _due_at(self, crl: SignedCrl) -> dt.datetime:
        """When ``crl`` must be re-signed: half its validity, or its first entry expiring."""
        due = crl.this_update + self._next_update / 2
        return min(due, crl.next_expiry) if crl.next_expiry is not None else due

    def _due_in(self) -> float:
        crl = self._crl
        if crl is None:
            return 0.0
        return max(0.0, (self._due_at(crl) - utcnow()).total_seconds())

    def _wait_for_work(self, stopping: threading.Event) -> bool:
        """Under the lock: wait until a CRL is to be built (asked for and spaced from the
        last one, or asked for by a reader, or due); False when stopping."""
        while not stopping.is_set():
            due = self._due_in()
            if due <= 0:
                return True
            if not self._requested:
                self._cond.wait(due)
                continue
            left = 0.0 if self._readers else self._last_built + RESIGN_SPACING_S - time.monotonic()
            if left <= 0:
                return True
            self._cond.wait(min(due, left))
        return False

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            with self._cond:
                if not self._wait_for_work(stopping):
                    return
                # Every request up to here is answered by the CRL built next.
                self._requested = False
            try:
                crl = self._build()
            except Exception as exc:
                self._failures += 1
                if self._on_failure is not None:
                    self._on_failure()
                log.error(
                    "crl signing failed error=%s failures=%d retry_in=%.1fs",
                    type(exc).__name__,
                    self._failures,
                    RETRY_AFTER_FAILURE_S,
                )
                with self._cond:
                    self._requested = True
                stopping.wait(RETRY_AFTER_FAILURE_S)
                continue
            with self._cond:
                self._crl = crl
                self._last_built = time.monotonic()
                self._cond.notify_all()

    def _build(self) -> SignedCrl:
        now = utcnow()
        with Session(self._engine) as session:
            contents = certificates.crl_contents(session, now)
        number, head, entries = contents.crl_number, contents.head_seq, contents.entries
        next_expiry = contents.next_expiry
        crl = self._ca.build_crl(entries, next_update=self._next_update, crl_number=number)
        if self._on_resign is not None:
            self._on_resign()
        log.info(
            "crl signed crl_number=%d head_seq=%d entries=%d next_update=%s",
            number,
            head,
            len(entries),
            crl.next_update_utc.isoformat() if crl.next_update_utc else "none",
        )
        return SignedCrl(
            pem=crl.public_bytes(serialization.Encoding.PEM),
            der=crl.public_bytes(serialization.Encoding.DER),
            crl_number=number,
            head_seq=head,
            this_update=now,
            entries=len(entries),
            next_expiry=next_expiry,
        )
