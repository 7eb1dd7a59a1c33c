"""One CRL per issuing CA (issue 26): after a rollover the earlier issuing CAs still trusted
sign their own CRL, served at ``/crl/<key id>.der`` (and ``.pem``) on the publication
listener; ``/crls.pem`` is every trusted issuing CA's CRL in one file (Mosquitto's
``crlfile``, ``openssl verify -CRLfile``).

The current issuing CA's CRL is the :class:`registry.crl.CrlCache` one (also at
``/crl.der``). An earlier one's is signed here on demand and kept until the revocation feed's
head moves or half its validity has passed. Each lists every revoked certificate of the fleet
still valid (serials are random 159-bit numbers, unique across issuing CAs), under the CRL
number sequence all CRLs share; its Issuing Distribution Point is ``<base>/crl.der``, the
distribution point its own certificates carry (they were issued when it was current).
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlmodel import Session

from factory.ca import CertificateAuthority
from factory.crl import build_crl
from fleetcore.clock import utcnow
from registry.crl import CrlCache
from registry.errors import NotFoundError
from registry.store import certificates, counters

__all__ = ["IssuerCrls"]


@dataclass(frozen=True)
class _Signed:
    der: bytes
    pem: bytes
    head_seq: int
    fresh_until: dt.datetime


class IssuerCrls:
    """The CRLs of every trusted issuing CA, by key id."""

    def __init__(
        self,
        ca: CertificateAuthority,
        engine: Engine,
        current: CrlCache,
        next_update: dt.timedelta = dt.timedelta(hours=24),
    ) -> None:
        self._ca = ca
        self._engine = engine
        self._current = current
        self._next_update = next_update
        self._lock = threading.Lock()
        self._cache: dict[str, _Signed] = {}

    def der(self, key_id: str) -> bytes:
        """The DER CRL of the issuing CA ``key_id``; NotFoundError for none of ours."""
        return self._get(key_id)[0]

    def pem(self, key_id: str) -> bytes:
        return self._get(key_id)[1]

    def all_pem(self) -> bytes:
        """Every trusted issuing CA's CRL, PEM, current first."""
        return b"".join(self.pem(issuer.key_id) for issuer in self._ca.issuers)

    def _get(self, key_id: str) -> tuple[bytes, bytes]:
        issuers = self._ca.issuers
        if key_id.lower() == issuers[0].key_id:
            current = self._current.current()
            return current.der, current.pem
        issuer = self._ca.issuer_by_key_id(key_id)
        if issuer is None:
            raise NotFoundError(
                f"no trusted issuing CA has key id {key_id[:64]!r} (GET /api/v1/issuers)"
            )
        now = utcnow()
        with self._lock, Session(self._engine) as session:
            head = counters.read(session, counters.REVOCATION_SEQ) or 0
            cached = self._cache.get(issuer.key_id)
            if cached is not None and cached.head_seq == head and now < cached.fresh_until:
                return cached.der, cached.pem
            contents = certificates.crl_contents(session, now)
            crl = build_crl(
                issuer.certificate,
                issuer.key,
                contents.entries,
                next_update=self._next_update,
                crl_number=contents.crl_number,
                publish_url=self._ca.publish_url,
            )
            signed = _Signed(
                crl.public_bytes(serialization.Encoding.DER),
                crl.public_bytes(serialization.Encoding.PEM),
                contents.head_seq,
                now + self._next_update / 2,
            )
            self._cache[issuer.key_id] = signed
        return signed.der, signed.pem
