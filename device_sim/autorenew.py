"""Automatic renewal: each simulated device renews its certificate by itself, over MQTT.

When the certificate reaches ``at`` of its lifetime (default 2/3, jittered by +-``jitter`` of
the lifetime so a fleet minted together does not ask together), the device generates a new
key, publishes a CSR on ``devices/<id>/cert/renew`` over its live connection and waits for the
answer on ``devices/<id>/cert/issued`` (:mod:`fleetcore.renewal_wire`). ``rate_limited``,
``busy``, ``registry_unavailable``, ``internal_error`` or no answer in ``timeout``: it backs off
with full jitter and asks again with the same key (a re-delivered CSR gets the same
certificate). Another refusal (``device_decommissioned``, ``invalid_csr``, ...) ends its
renewing.

A certificate is accepted only when it is for the device's identity and new key and signed by
the issuing CA of ``chain.pem``. It is then staged on disk, the device reconnects with it and,
only once that connection is up, promotes it (:mod:`device_sim.credentials`: there is never a
bundle that cannot connect). Over the new connection it publishes the confirm
``{"confirm": "<serial>"}`` and waits for ``{"confirmed": "<serial>"}``, retrying with backoff
up to ``confirm_attempts`` times. The outcome is one :class:`~device_sim.renewal_events.
RenewalEvent`.

Lifetime: the profile back-dates ``not_before`` by ``CLOCK_SKEW``; the device counts its
lifetime from ``not_before + CLOCK_SKEW`` (the issue time) so that ``at`` means the same for
a lifetime of minutes as for one of years.

A certificate that has expired cannot renew over MQTT (the broker refuses the handshake): the
device logs it, counts ``expired_before_renewal`` and stops renewing (docs/lifecycle.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim.backoff import Backoff
from device_sim.credentials import Credentials, CredentialStore
from device_sim.errors import SimError
from device_sim.renew import (
    BAD_ANSWER,
    RenewalRefusedError,
    adopt_issuing,
    check_certificate,
    issuing_of_answer,
)
from device_sim.renewal_events import RenewalEvent, RenewalOutcome
from device_sim.stats import WorkerStats
from fleetcore.errors import IdentityError
from fleetcore.keys import KEY_ALGORITHMS, build_csr, generate_key, private_key_pem
from fleetcore.profile import CLOCK_SKEW, PrivateKey, read_identity, serial_hex
from fleetcore.renewal_wire import (
    RETRYABLE_REFUSALS,
    AnswerError,
    Confirmed,
    Refusal,
    confirm_payload,
    parse_answer,
)

__all__ = ["RenewalLink", "RenewalPolicy", "Renewer", "renewal_due"]

log = logging.getLogger(__name__)

PEM = serialization.Encoding.PEM


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """When and how a device renews."""

    at: float = 2 / 3  # fraction of the lifetime
    jitter: float = 0.05  # +- this fraction of the lifetime
    timeout: float = 30.0  # seconds to wait for an answer (CSR or confirm)
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    confirm_attempts: int = 5
    key_algorithm: str = "p256"

    def __post_init__(self) -> None:
        if not 0 < self.at < 1:
            raise ValueError(f"renew-at must be between 0 and 1 (a fraction), got {self.at}")
        if not 0 <= self.jitter < 0.5:
            raise ValueError(f"renewal jitter must be in [0, 0.5), got {self.jitter}")
        if self.key_algorithm not in KEY_ALGORITHMS:
            raise ValueError(
                f"renewal key algorithm {self.key_algorithm!r} is not one of "
                f"{', '.join(sorted(KEY_ALGORITHMS))}"
            )


def renewal_due(certificate: x509.Certificate, policy: RenewalPolicy, rng: random.Random) -> float:
    """Unix time at which to renew ``certificate``."""
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    issued = not_before + CLOCK_SKEW if not_after - not_before > CLOCK_SKEW else not_before
    lifetime = (not_after - issued).total_seconds()
    fraction = policy.at + rng.uniform(-policy.jitter, policy.jitter)
    fraction = min(max(fraction, 0.05), 0.95)
    return issued.timestamp() + lifetime * fraction


class RenewalLink(Protocol):
    """What the renewer needs of its device's connection (SimDevice provides it)."""

    @property
    def running(self) -> bool:
        """False once the device's run has ended."""
        ...

    async def wait_connected(self, within: float) -> bool: ...

    async def exchange(self, payload: bytes, within: float) -> bytes | None:
        """Publish on the renew topic (QoS 1); the next answer on the issued topic, or None."""
        ...

    async def switch(self, credentials: Credentials) -> bool:
        """Reconnect with ``credentials``; True once connected with them."""
        ...

    async def wait_renew_request(self, within: float) -> bool:
        """True when an operator's renew-now notice came within ``within`` seconds."""
        ...


@dataclass(slots=True)
class _Tries:
    """The requests of one renewal so far."""

    started: float  # time.monotonic() of the first request
    attempts: int = 0
    timeouts: int = 0
    refused: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        """The counting fields of a RenewalEvent."""
        return {
            "attempts": self.attempts,
            "retried": max(0, self.attempts - 1),
            "timeouts": self.timeouts,
            "refused": tuple(self.refused),
        }


class Renewer:
    """One device's renewal loop; run as a task next to its connection."""

    def __init__(
        self,
        directory: Path,
        device_id: str,
        policy: RenewalPolicy,
        link: RenewalLink,
        stats: WorkerStats,
        rng: random.Random,
        sink: Callable[[RenewalEvent], None] | None = None,
    ) -> None:
        self.store = CredentialStore(directory)
        self.device_id = device_id
        self.policy = policy
        self.link = link
        self.stats = stats
        self.rng = rng
        self.sink = sink
        self._chain = directory / "chain.pem"
        self._root = directory / "root.crt"

    async def run(self) -> None:
        """Renew whenever due, until the run ends (cancelled) or renewing cannot go on."""
        try:
            await self._loop()
        except (OSError, ValueError, SimError, IdentityError) as exc:
            # The bundle cannot be renewed (unreadable chain, disk full...): the device goes
            # on publishing with the certificate it has.
            log.error("renewal stopped device_id=%s reason=%s", self.device_id, exc)

    async def _loop(self) -> None:
        while True:
            try:
                certificate = self.store.current().certificate()
            except SimError as exc:
                log.warning("renewal off device_id=%s reason=%s", self.device_id, exc)
                return
            due = renewal_due(certificate, self.policy, self.rng)
            if await self.link.wait_renew_request(max(0.0, due - time.time())):
                log.info("renewal asked by an operator device_id=%s", self.device_id)
            if not await self._renew(certificate):
                return

    # -- one renewal ----------------------------------------------------------------------

    def _expired(self, certificate: x509.Certificate, previous_serial: str, **kw: object) -> bool:
        self.stats.expired_before_renewal += 1
        log.error(
            "certificate expired before renewal device_id=%s serial=%s not_after=%s: it cannot "
            "renew over MQTT; an operator re-enrolls it from a CSR made on the device "
            "(certfleet registry devices reenroll, docs/lifecycle.md)",
            self.device_id,
            previous_serial,
            certificate.not_valid_after_utc.isoformat(),
        )
        self._emit(
            RenewalEvent(
                self.device_id,
                RenewalOutcome.EXPIRED_BEFORE_RENEWAL,
                time.time(),
                previous_serial,
                **kw,  # type: ignore[arg-type]
            )
        )
        return False

    async def _renew(self, current: x509.Certificate) -> bool:
        """One renewal, retried until it succeeds; False when renewing must stop."""
        previous_serial = serial_hex(current.serial_number)
        not_after = current.not_valid_after_utc.timestamp()
        identity = read_identity(current)
        issuing = x509.load_pem_x509_certificates(self._chain.read_bytes())[0]
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, self.rng)
        tries = _Tries(started=time.monotonic())
        key = generate_key(self.policy.key_algorithm)
        csr_pem = build_csr(key, identity).public_bytes(PEM)
        while True:
            left = not_after - time.time()
            if left <= 0 or not await self.link.wait_connected(left):
                if not self.link.running:
                    return False  # the run ended while waiting: not an expiry
                if time.time() < not_after:
                    continue
                return self._expired(current, previous_serial, **tries.counts())
            tries.attempts += 1
            self.stats.renewal_attempts += 1
            if tries.attempts > 1:
                self.stats.renewal_retried += 1
            sent = time.monotonic()
            answer = await self.link.exchange(csr_pem, self.policy.timeout)
            latency = time.monotonic() - sent
            signer = issuing if answer is None else issuing_of_answer(answer, issuing, self._root)
            certificate, code = self._read(answer, identity, key.public_key(), signer)
            if certificate is None:
                if not self._unanswered(code, previous_serial, tries):
                    return False
            else:
                received_at = time.time()
                if await self._switch(key, certificate):
                    self._adopt(signer)
                    await self._renewed(certificate, previous_serial, received_at, latency, tries)
                    return True
            await asyncio.sleep(backoff.next_delay())

    def _adopt(self, signer: x509.Certificate) -> None:
        """Trust the issuing CA that signed the renewed certificate (after a rollover)."""
        if adopt_issuing(self._chain.parent, signer):
            log.info(
                "device moved to a new issuing CA device_id=%s issuer=%s",
                self.device_id,
                signer.subject.rfc4514_string(),
            )

    def _unanswered(self, code: str | None, previous_serial: str, tries: _Tries) -> bool:
        """Count a request without a certificate; False when the refusal ends renewing."""
        if code is None:
            tries.timeouts += 1
            self.stats.renewal_timeouts += 1
            return True
        tries.refused.append(code)
        self.stats.renewal_refused[code] += 1
        if code in RETRYABLE_REFUSALS or code == BAD_ANSWER:
            return True
        log.warning("renewal refused device_id=%s error=%s: renewing stops", self.device_id, code)
        self._emit(
            RenewalEvent(
                self.device_id,
                RenewalOutcome.REFUSED,
                time.time(),
                previous_serial,
                **tries.counts(),
            )
        )
        return False

    async def _switch(self, key: PrivateKey, certificate: x509.Certificate) -> bool:
        """Stage the new credentials and reconnect with them; True once they are in use."""
        staged = self.store.stage(private_key_pem(key), certificate.public_bytes(PEM))
        if await self.link.switch(staged):
            self.store.promote()
            return True
        self.store.discard()
        self.stats.renewal_switch_failed += 1
        log.warning(
            "renewed certificate did not connect device_id=%s serial=%s: kept the old",
            self.device_id,
            serial_hex(certificate.serial_number),
        )
        return False

    async def _renewed(
        self,
        certificate: x509.Certificate,
        previous_serial: str,
        received_at: float,
        latency: float,
        tries: _Tries,
    ) -> None:
        """Count, log, confirm and report a renewal whose certificate is now in use."""
        self.stats.renewals += 1
        self.stats.renewal_latency.record(latency)
        serial = serial_hex(certificate.serial_number)
        total_ms = (time.monotonic() - tries.started) * 1000
        log.info(
            "certificate renewed device_id=%s serial=%s previous_serial=%s not_after=%s",
            self.device_id,
            serial,
            previous_serial,
            certificate.not_valid_after_utc.isoformat(),
        )
        confirmed = await self._confirm(serial)
        self._emit(
            RenewalEvent(
                self.device_id,
                RenewalOutcome.RENEWED,
                received_at,
                previous_serial,
                serial=serial,
                not_after=certificate.not_valid_after_utc.isoformat(),
                latency_ms=round(latency * 1000, 2),
                total_ms=round(total_ms, 2),
                confirmed=confirmed,
                **tries.counts(),
            )
        )

    def _read(
        self, answer: bytes | None, identity: object, public_key: object, issuing: x509.Certificate
    ) -> tuple[x509.Certificate | None, str | None]:
        """(certificate, None), (None, refusal code) or (None, None) for no answer."""
        if answer is None:
            return None, None
        try:
            parsed = parse_answer(answer)
        except AnswerError:
            return None, BAD_ANSWER
        if isinstance(parsed, Refusal):
            return None, parsed.error
        if isinstance(parsed, Confirmed):
            return None, None  # a late answer to an earlier confirm
        try:
            check_certificate(parsed, identity, public_key, issuing)  # type: ignore[arg-type]
        except (RenewalRefusedError, IdentityError):
            return None, BAD_ANSWER
        return parsed, None

    async def _confirm(self, serial: str) -> bool:
        """Tell the registry the new certificate is in use; True once it acknowledged."""
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, self.rng)
        for _ in range(self.policy.confirm_attempts):
            if await self.link.wait_connected(self.policy.timeout):
                answer = await self.link.exchange(confirm_payload(serial), self.policy.timeout)
                try:
                    parsed = parse_answer(answer) if answer is not None else None
                except AnswerError:
                    parsed = None
                if isinstance(parsed, Confirmed) and parsed.serial == serial:
                    self.stats.confirms["confirmed"] += 1
                    return True
                if isinstance(parsed, Refusal) and parsed.error not in RETRYABLE_REFUSALS:
                    self.stats.confirms[parsed.error] += 1
                    log.warning(
                        "confirm refused device_id=%s serial=%s error=%s message=%s",
                        self.device_id,
                        serial,
                        parsed.error,
                        parsed.message,
                    )
                    return False
            await asyncio.sleep(backoff.next_delay())
        self.stats.confirms["unanswered"] += 1
        log.warning("confirm unanswered device_id=%s serial=%s", self.device_id, serial)
        return False

    def _emit(self, event: RenewalEvent) -> None:
        if self.sink is not None:
            self.sink(event)
