"""Certificate renewal over MQTT: a device publishes a CSR, the registry answers with a cert.

A device publishes a PEM CSR to ``devices/<id>/cert/renew``; the registry's MQTT client
(:mod:`registry.telemetry`, connected as ``spiffe://<td>/service/registry``) hands it to
:class:`registry.renewal_service.RenewalService` (the worker thread), which answers on
``devices/<id>/cert/issued`` (QoS 1) with either the new leaf certificate (PEM) or a JSON
refusal ``{"error": "<code>", "message": "<why>"}``
(:mod:`fleetcore.renewal_wire`, codes :class:`~fleetcore.renewal_wire.RefusalCode`).

The checks, in order (each refusal is logged, counted and answered):

- ``too_large``: a payload over ``MAX_CSR_BYTES``;
- ``invalid_csr``: the factory's own CSR checks refuse it (:func:`factory.csr.load_csr` and
  :func:`factory.csr.validate_device_csr`: signature, key strength, CA:FALSE, exactly one
  device identity in our trust domain, CN = device id);
- ``identity_mismatch``: the CSR names another device than the topic it came on (the broker's
  ACL guarantees the topic is the sender's own);
- ``unknown_device`` / ``device_decommissioned``: only an active registered device is renewed;
- ``rate_limited``: at most ``registry_renewal_max_attempts`` requests per device per
  ``registry_renewal_min_interval_s`` (bad CSRs count too), and one renewal per device per
  interval (a re-delivered copy of the CSR just renewed, same key, gets the same certificate
  again). The limit lives in the ``renewal_limit`` table: a restart or a second registry
  process keeps it;
- ``busy`` (too many requests waiting) and ``registry_unavailable`` (the database failed).

This module is the signing policy (:class:`CertificateRenewer`: the checks, the signing, the
database write); the queue and the worker thread that run it are
:mod:`registry.renewal_service`. Retained renewal requests are ignored by the MQTT client
(:mod:`registry.telemetry`); answers are never retained.

The new certificate gets the device profile and the validity length of the device's newest
certificate, which carries the device's stagger offset from minting into every generation (or
``registry_renewal_lifetime_days`` plus the device's offset into
``registry_renewal_stagger_s``, docs/lifecycle.md "Renewals keep the stagger"), through the
one validity policy (:func:`fleetcore.validity.renewal_validity`). It is stored as a live
certificate of the device with an audit entry (actor ``spiffe://<td>/service/registry``,
action ``renew``). The previous certificate stays live until the device confirms the new one
(a JSON payload ``{"confirm": "<serial>"}`` on the same topic, :mod:`registry.supersede`) and
the grace has passed: the device may still use it.

Signing and the database writes run on the worker thread, never on paho's network thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlmodel import Session

from factory.ca import CertificateAuthority
from factory.csr import ValidatedCSR, load_csr, validate_device_csr
from factory.errors import CSRError
from fleetcore.clock import utcnow
from fleetcore.profile import NAME_PATTERN, IdentityKind, serial_hex
from fleetcore.renewal_wire import RefusalCode
from fleetcore.stagger import stagger_fraction_for_id
from fleetcore.topics import RENEW, device_of, renew_topic
from fleetcore.validity import renewal_validity
from registry.errors import (
    DecommissionedDeviceError,
    NotFoundError,
    RenewalRefused,
    RenewedTooSoonError,
)
from registry.store import renewals
from registry.store.audit import Actor

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_CSR_BYTES",
    "CertificateRenewer",
    "RenewalRefused",
    "RenewedCertificate",
    "device_of_renew_topic",
    "sign_next",
]

log = logging.getLogger(__name__)

MAX_CSR_BYTES = 16 * 1024
#: Lifetime of a renewed certificate when the device has none to copy it from.
DEFAULT_LIFETIME = dt.timedelta(days=365)
#: Requests (good or bad) per device per interval before ``rate_limited``.
DEFAULT_MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class RenewedCertificate:
    device_id: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    certificate_pem: str
    #: True when this is the certificate already sent for the same key (a re-delivered CSR).
    repeated: bool = False

    @classmethod
    def of(
        cls, stored: renewals.StoredCertificate, *, repeated: bool = False
    ) -> RenewedCertificate:
        return cls(
            stored.device_id,
            stored.serial,
            stored.not_before,
            stored.not_after,
            stored.certificate_pem,
            repeated,
        )


def device_of_renew_topic(topic: str) -> str:
    """``devices/<id>/cert/renew`` -> ``<id>``; RenewalRefused(``bad_topic``) otherwise."""
    device_id = device_of(topic, RENEW)
    if device_id is None or not NAME_PATTERN.fullmatch(device_id):
        raise RenewalRefused(
            RefusalCode.BAD_TOPIC, f"topic {topic[:200]!r} is not devices/<id>/cert/renew"
        )
    return device_id


def sign_next(
    ca: CertificateAuthority,
    validated: ValidatedCSR,
    previous: renewals.StoredCertificate | None,
    *,
    lifetime: dt.timedelta | None,
    stagger: dt.timedelta,
) -> renewals.StoredCertificate:
    """Sign the device's next certificate (a renewal's or a re-enrollment's) under the one
    validity policy: ``lifetime``, else that of ``previous`` (which carries the device's
    stagger offset from minting), else :data:`DEFAULT_LIFETIME`; the device's offset into
    ``stagger`` on top."""
    device_id = validated.identity.name
    if lifetime is None:
        lifetime = (
            previous.not_after - previous.not_before if previous is not None else DEFAULT_LIFETIME
        )
    validity = renewal_validity(
        utcnow(), lifetime, stagger=stagger, fraction=stagger_fraction_for_id(device_id)
    )
    issued = ca.issue_client(
        validated.identity,
        public_key=validated.public_key,
        not_before=validity.not_before,
        not_after=validity.not_after,
    )
    certificate = issued.certificate
    return renewals.StoredCertificate(
        device_id=device_id,
        serial=serial_hex(certificate.serial_number),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        certificate_pem=issued.certificate_pem.decode(),
        certificate=certificate,
    )


def answer_pem(ca: CertificateAuthority, certificate_pem: str) -> bytes:
    """A renewal's answer: the leaf, then the issuing CA that signed it, so that a device
    renewed by a new issuing CA (after ``certfleet ca rollover``) learns it (its ``chain.pem``);
    :func:`fleetcore.renewal_wire.parse_answer` reads the leaf, ``answer_issuers`` the rest."""
    leaf = certificate_pem.encode()
    issuer = ca.issuer_of(x509.load_pem_x509_certificate(leaf))
    if issuer is None:
        return leaf
    return leaf + issuer.certificate.public_bytes(serialization.Encoding.PEM)


class CertificateRenewer:
    """Checks a CSR, signs it with the issuing CA and records the certificate (synchronous)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        engine: Engine,
        *,
        min_interval_s: float = 300.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        lifetime: dt.timedelta | None = None,
        stagger: dt.timedelta = dt.timedelta(0),
        clock: Callable[[], dt.datetime] = utcnow,
        instance: str = "local",
        shared_group: bool = False,
    ) -> None:
        self.ca = ca
        self.instance = instance
        # Requests come through a shared group (one replica each): a retry whose claim another
        # replica holds is answered here after SHARED_CLAIM_TAKE_OVER, not left unanswered.
        self._claim_take_over = (
            renewals.SHARED_CLAIM_TAKE_OVER if shared_group else renewals.CLAIM_TTL
        )
        self.engine = engine
        self.min_interval_s = min_interval_s
        self.max_attempts = max_attempts
        self.lifetime = lifetime
        self.stagger = stagger
        self.actor = Actor(ca.identity(IdentityKind.SERVICE, "registry").uri)
        self._clock = clock

    @property
    def _interval(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.min_interval_s)

    def claim(self, device_id: str, payload: bytes) -> bool:
        """Whether this replica answers this request (:func:`registry.store.renewals.
        claim_request`); False: another replica sharing the database claimed it first."""
        with Session(self.engine) as session:
            return renewals.claim_request(
                session, device_id, payload, self.instance, utcnow(), self._claim_take_over
            )

    def renew(self, device_id: str, payload: bytes) -> RenewedCertificate:
        """The new certificate for ``device_id``'s CSR ``payload``, or RenewalRefused."""
        self.count_attempt(device_id)  # before any check: bad CSRs are limited too
        if len(payload) > MAX_CSR_BYTES:
            raise RenewalRefused(
                RefusalCode.TOO_LARGE, f"CSR of {len(payload)} bytes exceeds {MAX_CSR_BYTES} bytes"
            )
        return self.renew_validated(self._validate(device_id, payload))

    def renew_validated(self, validated: ValidatedCSR) -> RenewedCertificate:
        """The renewal of ``validated``'s device (its request already counted by
        :meth:`count_attempt` and its CSR checked): every rule but those two, for MQTT
        renewal and EST ``simplereenroll`` alike."""
        device_id = validated.identity.name
        key_sha256 = hashlib.sha256(
            validated.public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).hexdigest()
        with self._refusals(device_id), Session(self.engine) as session:
            basis = renewals.renewal_basis(
                session, device_id, key_sha256, self._clock(), self._interval
            )
        if basis.repeat is not None:
            return self._repeated(basis.repeat)
        previous = basis.previous
        signed = sign_next(
            self.ca, validated, previous, lifetime=self.lifetime, stagger=self.stagger
        )
        with self._refusals(device_id), Session(self.engine) as session:
            stored = renewals.record_renewal(
                session,
                signed,
                previous_serial=previous.serial if previous is not None else None,
                key_sha256=key_sha256,
                actor=self.actor,
                now=self._clock(),
                interval=self._interval,
            )
        if stored is not signed:
            return self._repeated(stored)
        return RenewedCertificate.of(stored)

    @staticmethod
    def _repeated(certificate: renewals.StoredCertificate) -> RenewedCertificate:
        log.info(
            "renewal repeated device_id=%s serial=%s (same key: same certificate sent again)",
            certificate.device_id,
            certificate.serial,
        )
        return RenewedCertificate.of(certificate, repeated=True)

    @contextmanager
    def _refusals(self, device_id: str) -> Iterator[None]:
        """The data layer's refusals as the codes a device is answered with."""
        try:
            yield
        except NotFoundError as exc:
            raise RenewalRefused(RefusalCode.UNKNOWN_DEVICE, str(exc)) from None
        except DecommissionedDeviceError as exc:
            raise RenewalRefused(RefusalCode.DEVICE_DECOMMISSIONED, str(exc)) from None
        except RenewedTooSoonError as exc:
            wait = math.ceil(self.min_interval_s - exc.since_s)
            raise RenewalRefused(
                RefusalCode.RATE_LIMITED,
                f"{exc}; at most one renewal per {self.min_interval_s:g} s "
                f"(CERTFLEET_REGISTRY_RENEWAL_MIN_INTERVAL_S): retry in {wait} s",
            ) from None

    def count_attempt(self, device_id: str) -> None:
        """Count one request of ``device_id`` in its window; refuse beyond ``max_attempts``."""
        if self.min_interval_s <= 0:
            return
        now = self._clock()
        with Session(self.engine) as session:
            window = renewals.count_attempt(session, device_id, now, self._interval)
        if window.attempts > self.max_attempts:
            wait = math.ceil((window.window_start + self._interval - now).total_seconds())
            raise RenewalRefused(
                RefusalCode.RATE_LIMITED,
                f"device {device_id} sent {window.attempts} renewal requests within "
                f"{self.min_interval_s:g} s; at most {self.max_attempts} "
                f"(CERTFLEET_REGISTRY_RENEWAL_MAX_ATTEMPTS): retry in {wait} s",
            )

    def _validate(self, device_id: str, payload: bytes) -> ValidatedCSR:
        try:
            validated = validate_device_csr(load_csr(bytes(payload)), self.ca.trust_domain)
        except CSRError as exc:
            raise RenewalRefused(RefusalCode.INVALID_CSR, str(exc)) from None
        if validated.identity.name != device_id:
            raise RenewalRefused(
                RefusalCode.IDENTITY_MISMATCH,
                f"CSR names device {validated.identity.name!r} but was sent on "
                f"{renew_topic(device_id)}; a device renews only itself",
            )
        return validated
