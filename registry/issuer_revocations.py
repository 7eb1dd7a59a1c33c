"""Issuing CAs revoked by the root (issue 26, ``certfleet ca revoke-issuing``), as the
registry's client-certificate checks see them.

A registry's TLS store keeps trusting a revoked issuing CA (``trust.pem`` is re-read to add
issuers, never to drop one, :class:`fleetcore.tls.TrustFile`), so every place that takes a
client certificate as an identity (REST, the console's sign-in, EST) asks
:meth:`IssuerRevocations.revoked_at` about the certificate's Authority Key Identifier and
refuses it when its issuing CA was revoked. The broker does the same from the feed
(:mod:`broker.issuers`).

The answer comes from the revocation feed in the database (the ``issuer_revoked`` event, one
indexed lookup): a revocation is known at once in the process that made it, and within
:data:`RECHECK_S` on every other registry node sharing the database. A revocation is
permanent, so a revoked key id is never asked about again; a key id not revoked is asked
again after :data:`RECHECK_S` (a handful of issuing CAs: a few lookups a second at most).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from cryptography import x509
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session

from factory.issuers import authority_key_id
from registry.store.issuers import issuer_revoked_at

__all__ = ["RECHECK_S", "IssuerRevocations", "RevokedIssuer"]

log = logging.getLogger(__name__)

#: How long "this issuing CA is not revoked" is believed before the database is asked again.
RECHECK_S = 1.0


class RevokedIssuer:
    """The revocation of one issuing CA: its key id and when the root revoked it."""

    __slots__ = ("key_id", "revoked_at")

    def __init__(self, key_id: str, revoked_at: dt.datetime) -> None:
        self.key_id = key_id
        self.revoked_at = revoked_at

    def describe(self) -> str:
        """For refusal messages: which CA, since when, and what to do."""
        return (
            f"issuing CA {self.key_id[:16]} was revoked by the root on "
            f"{self.revoked_at.isoformat(timespec='seconds')}: get a certificate from the "
            "current issuing CA ('certfleet ca issue-client', docs/factory.md)"
        )


class IssuerRevocations:
    """Which issuing CAs are revoked, cached per key id (module doc). Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        *,
        recheck_s: float = RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._recheck_s = recheck_s
        self._clock = clock
        self._lock = threading.Lock()
        self._revoked: dict[str, dt.datetime] = {}
        #: key id -> when it was last found not revoked (monotonic clock)
        self._checked: dict[str, float] = {}

    def learn(self, key_id: str, revoked_at: dt.datetime) -> None:
        """This process revoked ``key_id`` (after its commit): known at once."""
        with self._lock:
            self._revoked.setdefault(key_id.lower(), revoked_at)
            self._checked.pop(key_id.lower(), None)

    def revoked_at(self, key_id: str) -> dt.datetime | None:
        """When the issuing CA ``key_id`` was revoked, or None when it is not. When the
        database cannot be read, the last answer stands (logged)."""
        key_id = key_id.lower()
        with self._lock:
            known = self._revoked.get(key_id)
            checked = self._checked.get(key_id)
        if known is not None:
            return known
        now = self._clock()
        if checked is not None and now - checked < self._recheck_s:
            return None
        try:
            with Session(self._engine) as session:
                found = issuer_revoked_at(session, key_id)
        except (OperationalError, PoolTimeoutError) as exc:
            log.error(
                "revoked issuing CAs not re-read key_id=%s error=%s",
                key_id[:16],
                type(exc).__name__,
            )
            return None
        with self._lock:
            if found is not None:
                self._revoked.setdefault(key_id, found)
                self._checked.pop(key_id, None)
                log.warning("issuing CA found revoked key_id=%s", key_id[:16])
            else:
                self._checked[key_id] = now
        return found

    def revocation_of(self, certificate: x509.Certificate) -> RevokedIssuer | None:
        """The revocation of the issuing CA that signed ``certificate`` (by its Authority
        Key Identifier), or None."""
        key_id = authority_key_id(certificate)
        if key_id is None:
            return None
        revoked_at = self.revoked_at(key_id)
        return None if revoked_at is None else RevokedIssuer(key_id, revoked_at)
