"""The CRLs the registry serves: a base CRL and a delta CRL, signed by the issuing CA,
cached, re-signed by one thread.

A base CRL lists every revoked certificate still valid; the delta CRL (RFC 5280 5.2.4)
lists what the feed revoked since that base and names the base's CRL number in its Delta
CRL Indicator. A change re-signs the delta only, whose cost grows with the changes since
the base, not with the base. The base is re-signed on a schedule (``base_interval``, or half
its validity) and when its delta lists more than ``delta_max_entries``; a base that lists
fewer than ``per_change_entries`` is re-signed with every change too (a small fleet's
relying parties that cannot read deltas, Mosquitto and nginx, stay as current as before).

One signer thread (:class:`CrlCache`) signs. A decommission only *requests* a re-sign
(:meth:`CrlCache.request_resign`, no wait, no database connection); requests that arrive
while the signer works are merged into its next run. A reader (:meth:`CrlCache.current`,
:meth:`CrlCache.delta`) that finds its CRL stale asks for a re-sign and waits, bounded, for
the signer. A CRL is also re-signed when half its validity has passed and when its first
entry expires (``not_after`` + ``CLOCK_SKEW``; for a large base, at its next scheduled
re-sign): an expired certificate cannot be presented, so its entry leaves the CRL. Base and
delta take their CRLNumber from one database counter, allocated in the transaction that
reads their entries, so numbers only grow, across restarts and registry replicas.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session

from factory.ca import CertificateAuthority
from factory.crl import crl_pem
from fleetcore.clock import utcnow
from registry.errors import UnavailableError
from registry.store import certificates, revocations
from registry.store.certificates import CrlContents
from registry.supervise import SupervisedThread

__all__ = ["CrlCache", "SignedCrl"]

log = logging.getLogger(__name__)

#: How long a CRL reader waits for the signer before answering 503.
CRL_WAIT_S = 10.0
#: Wait after a failed signing (database down) before the signer tries again.
RETRY_AFTER_FAILURE_S = 1.0
#: A re-sign nobody waits for starts at least this long after the previous one: in a burst
#: of decommissions the signer otherwise signs back to back. A reader never waits for it.
RESIGN_SPACING_S = 0.25
#: Defaults of the registry's settings (docs/registry.md says how they were chosen).
BASE_INTERVAL = dt.timedelta(minutes=15)
DELTA_NEXT_UPDATE = dt.timedelta(hours=1)
PER_CHANGE_ENTRIES = 5_000
DELTA_MAX_ENTRIES = 5_000


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
    #: a delta CRL's base CRL number (its Delta CRL Indicator); None: a base CRL.
    delta_of: int | None = None


class CrlCache:
    """Holds the current base and delta CRLs and the one thread that signs them."""

    def __init__(
        self,
        ca: CertificateAuthority,
        engine: Engine,
        *,
        next_update: dt.timedelta = dt.timedelta(hours=24),
        base_interval: dt.timedelta = BASE_INTERVAL,
        delta_next_update: dt.timedelta = DELTA_NEXT_UPDATE,
        per_change_entries: int = PER_CHANGE_ENTRIES,
        delta_max_entries: int = DELTA_MAX_ENTRIES,
        on_resign: Callable[[], None] | None = None,
        on_delta: Callable[[], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        on_crash: Callable[[str], None] | None = None,
        wait_seconds: float = CRL_WAIT_S,
    ) -> None:
        self._ca = ca
        self._engine = engine
        self._next_update = next_update
        self._base_interval = base_interval
        self._delta_next_update = delta_next_update
        self._per_change_entries = per_change_entries
        self._delta_max_entries = delta_max_entries
        self._on_resign = on_resign
        self._on_delta = on_delta
        self._on_failure = on_failure
        self._wait_seconds = wait_seconds
        self._cond = threading.Condition()
        self._crl: SignedCrl | None = None
        self._delta: SignedCrl | None = None
        self._requested = False
        self._readers = 0  # threads in current() / delta() waiting for the signer
        self._last_built = 0.0  # time.monotonic() when the last CRL was built
        self._failures = 0
        self._signer = SupervisedThread("crl-signer", self._run, on_crash=on_crash)

    @property
    def signer(self) -> SupervisedThread:
        return self._signer

    def request_resign(self) -> None:
        """Ask the signer for CRLs as of the current head; returns at once."""
        with self._cond:
            self._requested = True
            self._cond.notify_all()
        self._signer.start()

    def current(self) -> SignedCrl:
        """The base CRL (waiting for the signer if it is due, or small and behind the feed).

        Raises UnavailableError (503) when the signer cannot produce it in time.
        """
        return self._wait_for(lambda: self._crl, self._fresh_base)

    def delta(self) -> SignedCrl:
        """The delta CRL as of the feed's current head, against the current base CRL.

        Raises UnavailableError (503) when the signer cannot produce it in time.
        """
        return self._wait_for(lambda: self._delta, self._fresh_delta)

    def close(self) -> None:
        self._signer.stop(0)
        with self._cond:
            self._cond.notify_all()
        self._signer.stop()

    def _wait_for(
        self, held: Callable[[], SignedCrl | None], fresh: Callable[[int], bool]
    ) -> SignedCrl:
        with Session(self._engine) as session:
            head = revocations.head_seq(session)
        with self._cond:
            crl = held()
            if crl is not None and fresh(head):
                return crl
            self._requested = True
            self._readers += 1
            self._cond.notify_all()
        try:
            self._signer.start()
            with self._cond:
                self._cond.wait_for(lambda: fresh(head), self._wait_seconds)
        finally:
            with self._cond:
                self._readers -= 1
        with self._cond:
            crl = held()
            if crl is None or not fresh(head):
                raise UnavailableError(
                    "the CRL could not be signed in time (is the database reachable?); retry"
                )
            return crl

    # -- when each CRL is due (called under the lock) ----------------------------------------

    def _per_change(self, crl: SignedCrl) -> bool:
        """A base small enough to be re-signed with every change."""
        return crl.entries < self._per_change_entries

    def _fresh_base(self, head: int) -> bool:
        crl = self._crl
        if crl is None or utcnow() >= self._base_due(crl):
            return False
        return crl.head_seq >= head or not self._per_change(crl)

    def _fresh_delta(self, head: int) -> bool:
        delta, base = self._delta, self._crl
        return (
            delta is not None
            and base is not None
            and delta.delta_of == base.crl_number
            and delta.head_seq >= head
            and utcnow() < self._delta_due(delta)
        )

    def _base_due(self, crl: SignedCrl) -> dt.datetime:
        """When the base must be re-signed: its schedule, half its validity, its first entry
        expiring (a small base), or now when its delta has grown past ``delta_max_entries``."""
        due = crl.this_update + min(self._base_interval, self._next_update / 2)
        if crl.next_expiry is not None and self._per_change(crl):
            due = min(due, crl.next_expiry)
        delta = self._delta
        if (
            delta is not None
            and delta.delta_of == crl.crl_number
            and delta.entries > self._delta_max_entries
        ):
            due = min(due, delta.this_update)
        return due

    def _delta_due(self, delta: SignedCrl) -> dt.datetime:
        due = delta.this_update + self._delta_next_update / 2
        return min(due, delta.next_expiry) if delta.next_expiry is not None else due

    def _due_in(self) -> float:
        crl, delta = self._crl, self._delta
        if crl is None or delta is None:
            return 0.0
        due = min(self._base_due(crl), self._delta_due(delta))
        return max(0.0, (due - utcnow()).total_seconds())

    # -- the signer ------------------------------------------------------------------------

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
                # Every request up to here is answered by the CRLs built next.
                self._requested = False
                base = self._crl
                rebase = base is None or utcnow() >= self._base_due(base) or self._per_change(base)
            try:
                if rebase or base is None:
                    base = self._sign_base()
                delta = self._sign_delta(base)
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
                self._crl, self._delta = base, delta
                self._last_built = time.monotonic()
                self._cond.notify_all()

    def _sign_base(self) -> SignedCrl:
        now = utcnow()
        with Session(self._engine) as session:
            contents = certificates.crl_contents(session, now)
        crl = self._sign(contents, now, self._next_update, delta_of=None)
        if self._on_resign is not None:
            self._on_resign()
        return crl

    def _sign_delta(self, base: SignedCrl) -> SignedCrl:
        now = utcnow()
        with Session(self._engine) as session:
            contents = certificates.delta_contents(session, now, base.head_seq)
        crl = self._sign(contents, now, self._delta_next_update, delta_of=base.crl_number)
        if self._on_delta is not None:
            self._on_delta()
        return crl

    def _sign(
        self,
        contents: CrlContents,
        now: dt.datetime,
        next_update: dt.timedelta,
        *,
        delta_of: int | None,
    ) -> SignedCrl:
        started = time.process_time()
        crl, der = self._ca.build_crl_der(
            contents.entries,
            next_update=next_update,
            crl_number=contents.crl_number,
            delta_of=delta_of,
        )
        log.info(
            "crl signed kind=%s crl_number=%d base=%s head_seq=%d entries=%d cpu_ms=%.1f "
            "next_update=%s",
            "base" if delta_of is None else "delta",
            contents.crl_number,
            "-" if delta_of is None else delta_of,
            contents.head_seq,
            len(contents.entries),
            (time.process_time() - started) * 1000,
            crl.next_update_utc.isoformat() if crl.next_update_utc else "none",
        )
        return SignedCrl(
            pem=crl_pem(der),
            der=der,
            crl_number=contents.crl_number,
            head_seq=contents.head_seq,
            this_update=now,
            entries=len(contents.entries),
            next_expiry=contents.next_expiry,
            delta_of=delta_of,
        )
