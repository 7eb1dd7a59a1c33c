"""The OCSP responder (RFC 6960): answers good, revoked (time and reason) or unknown.

Answers are signed by a delegated responder certificate (OCSPSigning EKU, issued by the
issuing CA, id-pkix-ocsp-nocheck) kept in ``<data>/ca/ocsp-responder.crt|.key``; it is
issued on first use and re-issued when less than a third of its lifetime is left. When the
CA's keys are in a PKCS#11 token (:mod:`factory.signer`), the responder's key is the token's
OCSP key: only the certificate is kept on disk, re-issued for the same key. The
request's nonce is echoed. A request about another issuer is answered ``unknown``.

A request may ask about several certificates at once (RFC 6960 4.1.1, ``openssl ocsp -cert a
-cert b``): cryptography reads and builds one only, so such a request is read and its
answer built with asn1crypto (:mod:`registry.ocsp_many`), each certificate answered in the
order asked, up to :data:`MAX_CERTIFICATES`; more is ``malformedRequest``.

An issuing CA revoked by the root (``certfleet ca revoke-issuing``): while the registry still
holds it (its CA folder not yet updated), every serial it signed is answered ``revoked``,
reason ``cACompromise``, at the CA's revocation time (RFC 6960 2.7), registered or not (an
operator's certificate too), signed by that CA as before. Once the CA folder drops it
(``revoke-issuing`` moves it to ``ca/retired/``) a request about it names none of our
issuers and is answered ``unknown``. Neither answer can be trusted more than the compromised
key: relying parties learn of the compromise from the root's CRL (``ca/revoked-issuers.crl``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session

from factory.ca import CertificateAuthority, write_issued
from factory.errors import CAError
from factory.issuers import Issuer
from factory.keys import load_private_key
from fleetcore.clock import utcnow
from fleetcore.profile import PrivateKey, PublicKey, serial_hex
from fleetcore.reasons import reason_flag
from registry import ocsp_many
from registry.issuer_revocations import IssuerRevocations
from registry.ocsp_many import CertId
from registry.store import certificates

__all__ = [
    "ANSWER_VALIDITY",
    "MAX_CERTIFICATES",
    "RESPONDER_LIFETIME",
    "CertificateStatus",
    "OcspResponder",
    "certificate_status",
]

log = logging.getLogger(__name__)

#: Certificates answered in one request at most: each is a lookup, and a relying party asks
#: about one chain's worth (openssl, nginx, Mosquitto ask about one).
MAX_CERTIFICATES = 100
RESPONDER_NAME = "ocsp-responder"
RESPONDER_LIFETIME = dt.timedelta(days=30)
#: nextUpdate of an answer: how long a relying party may cache it.
ANSWER_VALIDITY = dt.timedelta(hours=1)
#: thisUpdate is set this far back, for relying parties whose clock is slightly behind.
_BACKDATE = dt.timedelta(minutes=1)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    """What the registry knows about one serial."""

    status: Literal["good", "revoked", "unknown"]
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None


def certificate_status(session: Session, serial: int) -> CertificateStatus:
    """The status of ``serial`` (:func:`registry.certificates.certificate_status`): unknown when the
    registry never registered it; revoked with the decommission's time and reason code."""
    info = certificates.certificate_status(session, serial_hex(serial))
    if info is None:
        return CertificateStatus("unknown")
    if info.status != "revoked":
        return CertificateStatus("good")
    return CertificateStatus("revoked", info.revoked_at or utcnow(), reason_flag(info.reason_code))


def _public_key_bits(public_key: PublicKey) -> bytes:
    """The subjectPublicKey BIT STRING's contents, which the OCSP issuerKeyHash covers."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize()


class _Signer:
    """The delegated responder certificate and key: loaded, issued or renewed on demand."""

    def __init__(self, ca: CertificateAuthority, lifetime: dt.timedelta) -> None:
        self._ca = ca
        self._lifetime = lifetime
        self._lock = threading.Lock()
        self._current: tuple[x509.Certificate, PrivateKey] | None = None
        #: the token's OCSP key (opened now: a missing object or wrong PIN stops the start).
        self._token_key = ca.ocsp_token_key
        self._cert_path = ca.layout.ca_dir / f"{RESPONDER_NAME}.crt"
        self._key_path = ca.layout.ca_dir / f"{RESPONDER_NAME}.key"

    def get(self) -> tuple[x509.Certificate, PrivateKey]:
        with self._lock:
            if (
                self._current is None
                or self._due(self._current[0])
                or self._current[0].issuer != self._ca.issuing_cert.subject  # a rollover
            ):
                self._current = self._load() or self._issue()
            return self._current

    def _due(self, certificate: x509.Certificate) -> bool:
        left = certificate.not_valid_after_utc - utcnow()
        return left < self._lifetime / 3

    def _load(self) -> tuple[x509.Certificate, PrivateKey] | None:
        """The responder on disk, if it is this CA's and not due for renewal."""
        if not self._cert_path.exists() or (
            self._token_key is None and not self._key_path.exists()
        ):
            return None
        try:
            certificate = x509.load_pem_x509_certificate(self._cert_path.read_bytes())
            key = self._token_key or load_private_key(self._key_path, None)
            certificate.verify_directly_issued_by(self._ca.issuing_cert)  # the current CA's
        except (OSError, ValueError, TypeError, CAError, InvalidSignature) as exc:
            log.warning("ocsp responder certificate unusable, re-issuing error=%s", exc)
            return None
        if key.public_key() != certificate.public_key() or self._due(certificate):
            return None
        return certificate, key

    def _issue(self) -> tuple[x509.Certificate, PrivateKey]:
        issued = self._ca.issue_ocsp_responder(
            RESPONDER_NAME,
            lifetime=self._lifetime,
            public_key=self._token_key.public_key() if self._token_key is not None else None,
        )
        key = self._token_key or issued.private_key
        assert key is not None
        write_issued(issued, self._cert_path, self._key_path)
        log.info(
            "ocsp responder certificate issued serial=%s not_after=%s",
            serial_hex(issued.certificate.serial_number),
            issued.certificate.not_valid_after_utc.isoformat(),
        )
        return issued.certificate, key


class OcspResponder:
    """Turns a DER OCSP request into a signed DER OCSP response."""

    def __init__(
        self,
        ca: CertificateAuthority,
        engine: Engine,
        *,
        responder_lifetime: dt.timedelta = RESPONDER_LIFETIME,
        answer_validity: dt.timedelta = ANSWER_VALIDITY,
        revoked_issuers: IssuerRevocations | None = None,
    ) -> None:
        self._ca = ca
        self._engine = engine
        self._revoked_issuers = revoked_issuers
        self._signer = _Signer(ca, responder_lifetime)
        self._answer_validity = answer_validity
        self._ca = ca

    @property
    def responder_certificate(self) -> x509.Certificate:
        return self._signer.get()[0]

    def respond(self, request_der: bytes) -> bytes:
        """The DER response: malformedRequest for garbage, tryLater when the database is down."""
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            asked = [
                CertId(
                    request.hash_algorithm.name,
                    request.issuer_name_hash,
                    request.issuer_key_hash,
                    request.serial_number,
                )
            ]
        except NotImplementedError:  # several certificates in one request
            return self._respond_many(request_der)
        except ValueError as exc:
            return _malformed(str(exc))
        try:
            statuses = self._statuses(asked)
        except (OperationalError, PoolTimeoutError) as exc:
            return _try_later(exc)
        _log_answers(asked, statuses)
        return self._sign(request, statuses[0], self._issuer_of(asked[0]))

    def _respond_many(self, request_der: bytes) -> bytes:
        try:
            parsed = ocsp_many.read_request(request_der)
        except ValueError as exc:
            return _malformed(str(exc))
        if len(parsed.asked) > MAX_CERTIFICATES:
            return _malformed(f"{len(parsed.asked)} certificates, at most {MAX_CERTIFICATES}")
        try:
            statuses = self._statuses(parsed.asked)
        except (OperationalError, PoolTimeoutError) as exc:
            return _try_later(exc)
        responder_cert, responder_key = self._signer.get()
        der = ocsp_many.build_response(
            parsed,
            statuses,
            responder_cert,
            responder_key,
            responder_key_hash=_digest(
                hashes.SHA1(),  # noqa: S303 - RFC 6960's KeyHash is SHA-1 by definition
                _public_key_bits(responder_cert.public_key()),  # type: ignore[arg-type]
            ),
            produced_at=utcnow(),
            backdate=_BACKDATE,
            validity=self._answer_validity,
        )
        _log_answers(parsed.asked, statuses)
        return der

    def _statuses(self, asked: Sequence[CertId]) -> list[CertificateStatus]:
        """The status of each certificate asked about, in order (one database session)."""
        with Session(self._engine) as session:
            return [self._status(session, cert) for cert in asked]

    def _status(self, session: Session, cert: CertId) -> CertificateStatus:
        issuer = self._issuer_of(cert)
        if issuer is None:
            return CertificateStatus("unknown")
        if self._revoked_issuers is not None:
            # RFC 6960 2.7: every certificate of a compromised CA may be answered revoked.
            revoked_at = self._revoked_issuers.revoked_at(issuer.key_id)
            if revoked_at is not None:
                return CertificateStatus("revoked", revoked_at, x509.ReasonFlags.ca_compromise)
        return certificate_status(session, cert.serial)

    def _issuer_of(self, cert: CertId) -> Issuer | None:
        """The trusted issuing CA ``cert`` names (by the hashes of its name and key): the
        current one, or after a rollover an earlier one; None when it is none of ours."""
        algorithm_type = _HASHES.get(cert.hash_name)
        if algorithm_type is None:
            return None
        for issuer in self._ca.issuers:
            algorithm = algorithm_type()
            name = issuer.certificate.subject.public_bytes()
            key_bits = _public_key_bits(issuer.certificate.public_key())  # type: ignore[arg-type]
            if cert.issuer_name_hash == _digest(
                algorithm, name
            ) and cert.issuer_key_hash == _digest(algorithm, key_bits):
                return issuer
        return None

    def _responder(self, issuer: Issuer | None) -> tuple[x509.Certificate, PrivateKey]:
        """Who signs an answer: the delegated responder of the current issuing CA; for an
        earlier issuing CA (after a rollover) that CA itself (RFC 6960 4.2.2.2)."""
        if issuer is None or issuer.key_id == self._ca.issuers[0].key_id:
            return self._signer.get()
        return issuer.certificate, issuer.key

    def _sign(
        self, request: ocsp.OCSPRequest, status: CertificateStatus, issuer: Issuer | None
    ) -> bytes:
        responder_cert, responder_key = self._responder(issuer)
        now = utcnow()
        cert_status = {
            "good": ocsp.OCSPCertStatus.GOOD,
            "revoked": ocsp.OCSPCertStatus.REVOKED,
            "unknown": ocsp.OCSPCertStatus.UNKNOWN,
        }[status.status]
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=request.issuer_name_hash,
                issuer_key_hash=request.issuer_key_hash,
                serial_number=request.serial_number,
                algorithm=request.hash_algorithm,
                cert_status=cert_status,
                this_update=now - _BACKDATE,
                next_update=now + self._answer_validity,
                revocation_time=status.revoked_at,
                revocation_reason=status.reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
            .certificates([responder_cert])
        )
        try:
            nonce = request.extensions.get_extension_for_class(x509.OCSPNonce)
        except x509.ExtensionNotFound:
            pass
        else:
            builder = builder.add_extension(nonce.value, critical=False)
        algorithm = (
            None if isinstance(responder_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        )
        response = builder.sign(responder_key, algorithm)
        return response.public_bytes(serialization.Encoding.DER)


def _log_answers(asked: Sequence[CertId], statuses: Sequence[CertificateStatus]) -> None:
    for cert, status in zip(asked, statuses, strict=True):
        log.info(
            "ocsp answered serial=%s status=%s reason=%s",
            serial_hex(cert.serial),
            status.status,
            status.reason.value if status.reason else "-",
        )


def _malformed(error: str) -> bytes:
    log.info("ocsp request refused status=malformed error=%s", error[:200])
    return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)


def _try_later(exc: Exception) -> bytes:
    log.error("ocsp answer deferred status=try_later error=%s", type(exc).__name__)
    return _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
