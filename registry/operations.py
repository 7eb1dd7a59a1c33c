"""Operator operations: one service function per write operation, owning its transaction
and its after-commit effects.

The REST routes and every other entry point (the web console, the token CLI) call these
functions, so an operation's effects (feed wake-up, metrics, planner, log line, CRL re-sign)
happen the same way whoever asks. Each function opens and closes its own database session:
no connection is held once it returns, and nothing after the commit waits on the database.
Renewal over MQTT has its own service (:class:`registry.renewal_service.RenewalService`: answer,
count, log), on the same data layer (:mod:`registry.store.renewals`).

Operations that need the running app's parts (metrics, feed, CRL) take its
:class:`~registry.state.RegistryState`; token operations need only the database, so the
offline CLI can call them too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlmodel import Session

from factory.csr import load_csr, validate_device_csr
from factory.errors import CSRError
from fleetcore.clock import utcnow
from fleetcore.profile import DEFAULT_OPERATOR_ROLE, OperatorRole
from registry.errors import InvalidCSRError
from registry.models import BatchResult, DecommissionRequest, DecommissionResult, ReenrollResult
from registry.renewal import sign_next
from registry.state import RegistryState
from registry.store import devices, reenrollment, revocations, tokens
from registry.store.audit import Actor
from registry.store.supersede import SupersededRevocation

__all__ = [
    "create_token",
    "decommission_device",
    "reenroll_device",
    "register_devices",
    "revocations_committed",
    "revoke_tokens",
    "superseded_revoked",
]

log = logging.getLogger(__name__)


def register_devices(
    state: RegistryState, registrations: Sequence[devices.Registration], actor: Actor
) -> BatchResult:
    """Register certificates (one transaction, all or nothing, idempotent), then count the
    new ones, tell the query planner's statistics and log it."""
    with Session(state.engine) as session:
        result = devices.register_devices(session, registrations, actor)
    state.metrics.registrations.inc(result.created)
    state.planner.registered(result.created)
    if len(registrations) == 1:
        certificate = registrations[0].certificate
        log.info(
            "device registered device_id=%s serial=%s created=%d by=%s",
            certificate.device_id,
            certificate.serial,
            result.created,
            actor.who,
        )
    else:
        log.info(
            "devices registered count=%d created=%d existing=%d by=%s",
            len(registrations),
            result.created,
            result.existing,
            actor.who,
        )
    return result


def decommission_device(
    state: RegistryState, device_id: str, request: DecommissionRequest, actor: Actor
) -> DecommissionResult:
    """Decommission ``device_id``: revoke its live certificates and append one feed event
    (one transaction), then wake feed readers, count it, log it and request a CRL re-sign
    (coalesced with every other request; returns without waiting for it).

    Raises NotFoundError (404) / AlreadyDecommissionedError (409); a database that cannot be
    reached or a pool that is exhausted surfaces as a 503 through the app's handlers.
    """
    with Session(state.engine) as session:
        result = revocations.decommission_device(
            session, device_id, request.reason, actor, reason_code=request.reason_code
        )
    revocations_committed(state, result.revocation_seq, resign=False)
    state.metrics.decommissions.inc()
    log.info(
        "device decommissioned device_id=%s seq=%d reason_code=%s serials=%s by=%s",
        device_id,
        result.revocation_seq,
        request.reason_code,
        ",".join(c.serial for c in result.certificates if c.status == "revoked") or "-",
        actor.who,
    )
    state.crl.request_resign()
    return result


def reenroll_device(
    state: RegistryState, device_id: str, csr_pem: str, actor: Actor
) -> ReenrollResult:
    """Give ``device_id``, whose certificates have all expired, a certificate for the CSR made
    on the device (the key never leaves it), under the renewal's validity policy. The same
    CSR again gets the same certificate (``repeated``: an answer lost on the way).

    Raises InvalidCSRError (422: the factory's CSR checks, or a CSR for another device),
    NotFoundError (404), DecommissionedDeviceError or LiveCertificateError (409: a device
    with a valid certificate renews itself over MQTT). Nothing is written on a refusal.
    """
    try:
        validated = validate_device_csr(load_csr(csr_pem.encode()), state.ca.trust_domain)
    except CSRError as exc:
        raise InvalidCSRError(str(exc)) from None
    if validated.identity.name != device_id:
        raise InvalidCSRError(
            f"CSR names device {validated.identity.name!r}, not {device_id!r}; the CSR must "
            "come from the device being re-enrolled"
        )
    key_der = validated.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with Session(state.engine) as session:
        basis = reenrollment.reenrollment_basis(session, device_id, key_der, utcnow())
    previous = basis.previous
    previous_serial = previous.serial if previous is not None else None
    if basis.repeat is not None:
        stored, repeated = basis.repeat, True
    else:
        issued = sign_next(
            state.ca,
            validated,
            previous,
            lifetime=state.settings.renewal_lifetime,
            stagger=state.settings.renewal_stagger,
        )
        with Session(state.engine) as session:
            stored = reenrollment.record_reenrollment(
                session,
                issued,
                key_der=key_der,
                previous_serial=previous_serial,
                actor=actor,
                now=utcnow(),
            )
        repeated = stored is not issued
    if repeated:
        log.info(
            "device reenrolled again device_id=%s serial=%s (same key: same certificate) by=%s",
            device_id,
            stored.serial,
            actor.who,
        )
    else:
        state.metrics.reenrollments.inc()
        log.info(
            "device reenrolled device_id=%s serial=%s previous_serial=%s not_after=%s by=%s",
            device_id,
            stored.serial,
            previous_serial or "-",
            stored.not_after.isoformat(),
            actor.who,
        )
    return ReenrollResult(
        device_id=device_id,
        serial=stored.serial,
        not_before=stored.not_before,
        not_after=stored.not_after,
        previous_serial=None if repeated else previous_serial,
        repeated=repeated,
        certificate_pem=stored.certificate_pem,
        chain_pem=state.ca.chain_pem.decode(),
    )


def revocations_committed(state: RegistryState, last_seq: int, *, resign: bool = True) -> None:
    """After-commit effects of any feed event up to ``last_seq`` (a decommission, superseded
    certificates): the feed mark, the long-poll wake-up and (``resign``) a CRL re-sign."""
    if state.mark is not None:
        state.mark.advance(last_seq)
    state.feed.published()
    if resign:
        state.crl.request_resign()


def superseded_revoked(state: RegistryState, events: Sequence[SupersededRevocation]) -> None:
    """After the supersede worker committed ``events`` (registry/supersede.py): the feed
    mark, the long-poll wake-up, a CRL re-sign request, the metric and one log line each."""
    if not events:
        return
    revocations_committed(state, max(e.seq for e in events))
    state.metrics.superseded.inc(sum(len(e.serials) for e in events))
    for event in events:
        log.info(
            "superseded certificates revoked device_id=%s serials=%s seq=%d",
            event.device_id,
            ",".join(event.serials),
            event.seq,
        )


def create_token(
    engine: Engine, operator: str, actor: Actor, role: OperatorRole = DEFAULT_OPERATOR_ROLE
) -> str:
    """Create a bearer token for ``operator`` acting with ``role`` (with its audit entry) and
    log it (never the token); returns the token, the only time it exists in clear."""
    with Session(engine) as session:
        token = tokens.create_token(session, operator, actor, role)
    log.info("token created operator=%s role=%s by=%s", operator, role, actor.who)
    return token


def revoke_tokens(
    engine: Engine,
    actor: Actor,
    *,
    token_id: int | None = None,
    operator: str | None = None,
) -> tokens.TokenRevocation:
    """Revoke one token or all of an operator's (one transaction, one audit entry per token
    revoked), then log each; effective on the token's next request."""
    with Session(engine) as session:
        outcome = tokens.revoke_tokens(session, actor, token_id=token_id, operator=operator)
    for token in outcome.revoked:
        log.info("token revoked token_id=%d operator=%s by=%s", token.id, token.operator, actor.who)
    return outcome
