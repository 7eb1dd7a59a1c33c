"""The CRL the registry serves: signed by the issuing CA, cached, re-signed when needed.

It is rebuilt when the revocation feed's head moved (every revocation, from this process
or another one writing the same database), and when half of its validity has passed.
CRLNumber comes from a database counter, so it only ever grows.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlmodel import Session

from factory.ca import CertificateAuthority
from registry import crud
from registry.models import utcnow

__all__ = ["CrlCache", "SignedCrl"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SignedCrl:
    pem: bytes
    der: bytes
    crl_number: int
    head_seq: int
    this_update: dt.datetime
    entries: int


class CrlCache:
    """Holds the current signed CRL; :meth:`current` re-signs it when it is out of date."""

    def __init__(
        self,
        ca: CertificateAuthority,
        engine: Engine,
        *,
        next_update: dt.timedelta = dt.timedelta(hours=24),
        on_resign: Callable[[], None] | None = None,
    ) -> None:
        self._ca = ca
        self._engine = engine
        self._next_update = next_update
        self._lock = threading.Lock()
        self._crl: SignedCrl | None = None
        self._on_resign = on_resign

    def current(self) -> SignedCrl:
        """The CRL as of the feed's current head (re-signed first if that moved)."""
        with self._lock:
            with Session(self._engine) as session:
                head = crud.head_seq(session)
            crl = self._crl
            now = utcnow()
            if (
                crl is None
                or crl.head_seq != head
                or now - crl.this_update >= self._next_update / 2
            ):
                crl = self._build(head, now)
                self._crl = crl
            return crl

    def _build(self, head: int, now: dt.datetime) -> SignedCrl:
        with Session(self._engine) as session:
            entries = crud.revoked_entries(session, now)
        with Session(self._engine) as session:
            number = crud.next_crl_number(session)
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
        )
