"""Certificate renewal over MQTT: a device publishes a CSR, the registry answers with a cert.

A device publishes a PEM CSR to ``devices/<id>/cert/renew``; the registry's MQTT client
(:mod:`registry.telemetry`, connected as ``spiffe://<td>/service/registry``) hands it to
:class:`RenewalService`, which answers on ``devices/<id>/cert/issued`` (QoS 1) with either the
new leaf certificate (PEM) or a JSON refusal ``{"error": "<code>", "message": "<why>"}``.

The checks, in order (each refusal is logged, counted and answered):

- ``too_large``: a payload over ``MAX_CSR_BYTES``;
- ``invalid_csr``: the factory's own CSR checks refuse it (:func:`factory.csr.load_csr` and
  :func:`factory.csr.validate_device_csr`: signature, key strength, CA:FALSE, exactly one
  device identity in our trust domain, CN = device id);
- ``identity_mismatch``: the CSR names another device than the topic it came on (the broker's
  ACL guarantees the topic is the sender's own);
- ``unknown_device`` / ``device_decommissioned``: only an active registered device is renewed;
- ``rate_limited``: one renewal per device per ``registry_renewal_min_interval_s`` (a
  re-delivered copy of the CSR just renewed, same key, gets the same certificate again);
- ``busy`` (too many requests waiting) and ``registry_unavailable`` (the database failed).

The new certificate gets the device profile and the validity length of the device's newest
certificate (or ``registry_renewal_lifetime_days``). It is stored as a live certificate of the
device with an audit entry (actor ``spiffe://<td>/service/registry``, action ``renew``). The
previous certificate stays live until it expires: the device may still be using it.

Signing and the database write run on one worker thread, never on paho's network thread.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from factory.ca import CertificateAuthority, utcnow
from factory.csr import ValidatedCSR, load_csr, validate_device_csr
from factory.errors import CertfleetError, CSRError
from factory.profile import CLOCK_SKEW, NAME_PATTERN, IdentityKind, serial_hex
from registry.crud import Actor, audit
from registry.db import begin_write
from registry.models import Certificate, Device

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_CSR_BYTES",
    "RENEW_TOPIC_FILTER",
    "CertificateRenewer",
    "RenewalRefused",
    "RenewalService",
    "RenewedCertificate",
    "device_of_renew_topic",
    "issued_topic",
]

log = logging.getLogger(__name__)

RENEW_TOPIC_FILTER = "devices/+/cert/renew"
MAX_CSR_BYTES = 16 * 1024
#: Lifetime of a renewed certificate when the device has none to copy it from.
DEFAULT_LIFETIME = dt.timedelta(days=365)
#: CSRs waiting for the worker beyond this are refused with ``busy``.
MAX_PENDING = 1000


class RenewalRefused(CertfleetError):
    """A renewal request the registry refuses; ``error`` is the code sent to the device."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error

    def payload(self) -> bytes:
        return json.dumps({"error": self.error, "message": str(self)}).encode()


@dataclass(frozen=True, slots=True)
class RenewedCertificate:
    device_id: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    certificate_pem: str
    #: True when this is the certificate already sent for the same key (a re-delivered CSR).
    repeated: bool = False


def device_of_renew_topic(topic: str) -> str:
    """``devices/<id>/cert/renew`` -> ``<id>``; RenewalRefused(``bad_topic``) otherwise."""
    parts = topic.split("/")
    if (
        len(parts) != 4
        or parts[0] != "devices"
        or parts[2:] != ["cert", "renew"]
        or not NAME_PATTERN.fullmatch(parts[1])
    ):
        raise RenewalRefused("bad_topic", f"topic {topic[:200]!r} is not devices/<id>/cert/renew")
    return parts[1]


def issued_topic(device_id: str) -> str:
    return f"devices/{device_id}/cert/issued"


@dataclass(frozen=True, slots=True)
class _Recent:
    at: float  # time.monotonic() of the renewal
    public_key: bytes  # SubjectPublicKeyInfo DER of the renewed key
    renewed: RenewedCertificate


class CertificateRenewer:
    """Checks a CSR, signs it with the issuing CA and records the certificate (synchronous)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        engine: Engine,
        *,
        min_interval_s: float = 300.0,
        lifetime: dt.timedelta | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ca = ca
        self.engine = engine
        self.min_interval_s = min_interval_s
        self.lifetime = lifetime
        self.actor = Actor(ca.identity(IdentityKind.SERVICE, "registry").uri)
        self._clock = clock
        self._recent: dict[str, _Recent] = {}
        self._lock = threading.Lock()

    def renew(self, device_id: str, payload: bytes) -> RenewedCertificate:
        """The new certificate for ``device_id``'s CSR ``payload``, or RenewalRefused."""
        if len(payload) > MAX_CSR_BYTES:
            raise RenewalRefused(
                "too_large", f"CSR of {len(payload)} bytes exceeds {MAX_CSR_BYTES} bytes"
            )
        validated = self._validate(device_id, payload)
        public_key = validated.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with Session(self.engine) as session:
            previous = self._current_certificate(session, device_id)
        duplicate = self._check_rate(device_id, public_key)
        if duplicate is not None:
            return duplicate
        lifetime = self.lifetime or (
            previous.not_after - previous.not_before if previous is not None else DEFAULT_LIFETIME
        )
        not_before = utcnow() - CLOCK_SKEW
        issued = self.ca.issue_client(
            validated.identity,
            public_key=validated.public_key,
            not_before=not_before,
            not_after=not_before + lifetime,
        )
        certificate = issued.certificate
        renewed = RenewedCertificate(
            device_id=device_id,
            serial=serial_hex(certificate.serial_number),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            certificate_pem=issued.certificate_pem.decode(),
        )
        self._store(renewed, previous.serial if previous is not None else None)
        with self._lock:
            self._recent[device_id] = _Recent(self._clock(), public_key, renewed)
        return renewed

    def _validate(self, device_id: str, payload: bytes) -> ValidatedCSR:
        try:
            validated = validate_device_csr(load_csr(bytes(payload)), self.ca.trust_domain)
        except CSRError as exc:
            raise RenewalRefused("invalid_csr", str(exc)) from None
        if validated.identity.name != device_id:
            raise RenewalRefused(
                "identity_mismatch",
                f"CSR names device {validated.identity.name!r} but was sent on "
                f"devices/{device_id}/cert/renew; a device renews only itself",
            )
        return validated

    @staticmethod
    def _check_active(device: Device | None, device_id: str) -> None:
        if device is None:
            raise RenewalRefused(
                "unknown_device",
                f"device {device_id} is not registered; register it before renewing",
            )
        if device.status != "active":
            raise RenewalRefused(
                "device_decommissioned",
                f"device {device_id} is decommissioned; it cannot be given new certificates",
            )

    def _current_certificate(self, session: Session, device_id: str) -> Certificate | None:
        self._check_active(session.get(Device, device_id), device_id)
        return session.exec(
            select(Certificate)
            .where(Certificate.device_id == device_id)
            .order_by(col(Certificate.not_after).desc())
            .limit(1)
        ).first()

    def _check_rate(self, device_id: str, public_key: bytes) -> RenewedCertificate | None:
        """The certificate to send again for a re-delivered CSR, None to go ahead, or refuse."""
        now = self._clock()
        with self._lock:
            if len(self._recent) > 10_000:  # forget renewals older than the interval
                self._recent = {
                    k: v for k, v in self._recent.items() if now - v.at < self.min_interval_s
                }
            recent = self._recent.get(device_id)
        if recent is None or now - recent.at >= self.min_interval_s:
            return None
        if recent.public_key == public_key:
            log.info(
                "renewal repeated device_id=%s serial=%s (same key: same certificate sent again)",
                device_id,
                recent.renewed.serial,
            )
            return dataclasses.replace(recent.renewed, repeated=True)
        wait = math.ceil(self.min_interval_s - (now - recent.at))
        raise RenewalRefused(
            "rate_limited",
            f"device {device_id} was renewed {now - recent.at:.0f} s ago; at most one renewal "
            f"per {self.min_interval_s:g} s (CERTFLEET_REGISTRY_RENEWAL_MIN_INTERVAL_S): "
            f"retry in {wait} s",
        )

    def _store(self, renewed: RenewedCertificate, previous_serial: str | None) -> None:
        """Add the certificate and its audit entry, re-checking the device under the write
        lock: a decommission that committed since the first check wins."""
        with Session(self.engine) as session:
            begin_write(session)
            try:
                device = session.exec(
                    select(Device).where(Device.device_id == renewed.device_id).with_for_update()
                ).one_or_none()
                self._check_active(device, renewed.device_id)
                session.add(
                    Certificate(
                        serial=renewed.serial,
                        device_id=renewed.device_id,
                        not_before=renewed.not_before,
                        not_after=renewed.not_after,
                        status="live",
                        revoked_at=None,
                        certificate_pem=renewed.certificate_pem,
                    )
                )
                audit(
                    session,
                    self.actor,
                    "renew",
                    renewed.device_id,
                    {
                        "serial": renewed.serial,
                        "previous_serial": previous_serial,
                        "not_after": renewed.not_after.isoformat(),
                    },
                )
                session.commit()
            except BaseException:
                session.rollback()
                raise


class RenewalService:
    """Takes CSRs from the MQTT receive path, renews them on one worker thread, and
    publishes each answer on ``devices/<id>/cert/issued``.

    ``publish(topic, payload)`` must be thread-safe (paho's ``Client.publish`` is).
    ``counters`` counts outcomes: ``issued``, ``repeated`` and each refusal code (and
    ``on_outcome``, when given, is called with each: the app feeds its Prometheus counter).
    """

    def __init__(
        self,
        renewer: CertificateRenewer,
        publish: Callable[[str, bytes], None],
        *,
        max_pending: int = MAX_PENDING,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.renewer = renewer
        self.counters: Counter[str] = Counter()
        self._publish = publish
        self._on_outcome = on_outcome
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="renewal")

    def submit(self, topic: str, payload: bytes | bytearray) -> None:
        """Queue one CSR (called on paho's network thread: never blocks on crypto or DB)."""
        try:
            device_id = device_of_renew_topic(topic)
        except RenewalRefused as exc:
            self._count(exc.error)
            log.warning("renewal refused topic=%r error=%s", topic[:200], exc.error)
            return  # no device to answer
        with self._lock:
            busy = self._pending >= self._max_pending
            if not busy:
                self._pending += 1
        if busy:
            self._refuse(
                device_id,
                RenewalRefused(
                    "busy", f"{self._max_pending} renewals are waiting; retry in a minute"
                ),
            )
            return
        try:
            self._executor.submit(self._handle, device_id, bytes(payload))
        except RuntimeError:  # shut down
            with self._lock:
                self._pending -= 1

    def _handle(self, device_id: str, payload: bytes) -> None:
        try:
            renewed = self.renewer.renew(device_id, payload)
        except RenewalRefused as exc:
            self._refuse(device_id, exc)
            return
        except SQLAlchemyError as exc:
            log.error("renewal failed device_id=%s error=%s", device_id, type(exc).__name__)
            self._refuse(
                device_id,
                RenewalRefused(
                    "registry_unavailable",
                    "the registry could not record the certificate; retry later",
                ),
            )
            return
        except Exception:  # a bug must not kill the worker silently; the device is told
            log.exception("renewal crashed device_id=%s", device_id)
            self._refuse(
                device_id, RenewalRefused("internal_error", "the registry failed; retry later")
            )
            return
        finally:
            with self._lock:
                self._pending -= 1
        self._count("repeated" if renewed.repeated else "issued")
        if not renewed.repeated:
            log.info(
                "certificate renewed device_id=%s serial=%s not_after=%s",
                device_id,
                renewed.serial,
                renewed.not_after.isoformat(),
            )
        self._publish(issued_topic(device_id), renewed.certificate_pem.encode())

    def _refuse(self, device_id: str, refusal: RenewalRefused) -> None:
        self._count(refusal.error)
        log.warning(
            "renewal refused device_id=%s error=%s message=%s", device_id, refusal.error, refusal
        )
        self._publish(issued_topic(device_id), refusal.payload())

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counters[outcome] += 1
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def close(self) -> None:
        """Finish the request in progress, drop the queued ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        log.info("renewal service stopped outcomes=%s", dict(self.counters))
