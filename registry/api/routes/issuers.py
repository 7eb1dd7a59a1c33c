"""Issuing CAs (issue 26): who is on which, and the revocation of one by the root."""

from __future__ import annotations

import logging
from typing import Any

from cryptography import x509
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlmodel import Session

from factory.errors import CAError
from factory.issuers import check_issuer_revocation, issuer_key_id
from fleetcore.clock import utcnow
from registry.api.deps import CurrentAdmin, CurrentViewer, SessionDep, StateDep
from registry.api.routes import API_PREFIX
from registry.errors import InvalidRequestError
from registry.operations import revocations_committed
from registry.store.issuers import issuer_revoked_at, issuer_use, revoke_issuer_certificates

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix=f"{API_PREFIX}/issuers", tags=["issuers"])

_ERROR = {"description": "refused, with {'detail': {'error': code, 'message': text}}"}
_REFUSALS: dict[int | str, dict[str, Any]] = {401: _ERROR, 403: _ERROR, 422: _ERROR}


class IssuerInfo(BaseModel):
    key_id: str
    subject: str
    current: bool
    not_after: str
    live_certificates: int
    devices: int


class IssuerRevocation(BaseModel):
    """``certfleet ca revoke-issuing``: the issuing CA and the root's CRL listing it; the
    root's signature is what authorizes the revocation (with the admin role)."""

    issuer_pem: str = Field(max_length=20_000)
    arl_pem: str = Field(max_length=1_000_000)
    reason: str = Field(default="issuing CA compromised", max_length=500)


class IssuerRevocationResult(BaseModel):
    key_id: str
    revoked_certificates: int
    revocation_seq: int


@router.get("", response_model=list[IssuerInfo], responses=_REFUSALS)
def list_issuers(caller: CurrentViewer, state: StateDep, session: SessionDep) -> list[IssuerInfo]:
    """The trusted issuing CAs (current first) with their live certificates and devices."""
    use = issuer_use(session, utcnow())
    current = state.ca.issuers[0].key_id
    return [
        IssuerInfo(
            key_id=issuer.key_id,
            subject=issuer.certificate.subject.rfc4514_string(),
            current=issuer.key_id == current,
            not_after=issuer.certificate.not_valid_after_utc.isoformat(),
            live_certificates=use.certificates.get(issuer.key_id, 0),
            devices=use.devices.get(issuer.key_id, 0),
        )
        for issuer in state.ca.issuers
    ]


@router.post("/revoke", response_model=IssuerRevocationResult, responses=_REFUSALS)
def revoke_issuer(
    body: IssuerRevocation, caller: CurrentAdmin, state: StateDep, request: Request
) -> IssuerRevocationResult:
    """Act on the root's revocation of an issuing CA (admin): every live certificate it
    signed is revoked and one ``issuer_revoked`` feed event tells the brokers, which refuse
    all its certificates at CONNECT and drop their sessions. Its operator and service
    certificates are refused by every registry from then on (within a second on other nodes)
    and every console session opened with a certificate ends."""
    try:
        issuing = x509.load_pem_x509_certificate(body.issuer_pem.encode())
        arl = x509.load_pem_x509_crl(body.arl_pem.encode())
        key_id = check_issuer_revocation(state.ca.root_cert, issuing, arl)
    except (ValueError, CAError) as exc:
        raise InvalidRequestError(f"not a revocation of an issuing CA by our root: {exc}") from None
    if key_id == issuer_key_id(state.ca.issuing_cert):
        raise InvalidRequestError(
            "that is the current issuing CA: roll over first ('certfleet ca rollover')"
        )
    with Session(state.engine) as session:
        seq, serials = revoke_issuer_certificates(
            session, key_id, caller.actor(request), body.reason
        )
        # Its operator and service certificates are refused from the next request on.
        state.revoked_issuers.learn(key_id, issuer_revoked_at(session, key_id) or utcnow())
    revocations_committed(state, seq)
    log.warning(
        "issuing CA revoked key_id=%s certificates=%d seq=%d by=%s",
        key_id,
        len(serials),
        seq,
        caller.uri,
    )
    return IssuerRevocationResult(
        key_id=key_id, revoked_certificates=len(serials), revocation_seq=seq
    )
