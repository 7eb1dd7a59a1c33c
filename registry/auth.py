"""Who is calling: an mTLS client certificate or an operator bearer token.

Rules (DESIGN.md): operator endpoints need an operator with a role that allows them
(:class:`fleetcore.profile.OperatorRole`: viewer reads, operator acts on devices, admin runs
tokens and the CA; the role comes from the operator certificate's role extension or the
token's row, ``operator`` when they carry none); services may read the feed and metrics, and
``service/factory`` may register devices; a device identity is refused (403); no identity is
refused (401). When an ``Authorization`` header is present it is what counts
(a bad token is a 401 even over an mTLS connection); otherwise the client certificate does,
and a certificate whose issuing CA the root revoked (``certfleet ca revoke-issuing``) is
refused (401, :mod:`registry.issuer_revocations`), whoever it names.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from fastapi import HTTPException, Request, status
from sqlmodel import Session

from fleetcore.errors import IdentityError
from fleetcore.profile import (
    Identity,
    IdentityKind,
    OperatorRole,
    read_identity,
    read_operator_role,
    serial_hex,
)
from registry.errors import Refused
from registry.issuer_revocations import IssuerRevocations
from registry.metrics import RegistryMetrics
from registry.settings import IPNetwork
from registry.store import audit, tokens
from registry.tls import peer_certificate_der

__all__ = [
    "Caller",
    "Refused",
    "authenticate",
    "caller_from_certificate",
    "caller_from_token",
    "client_addr",
    "client_host",
    "forwarded_for",
    "refuse",
    "request_actor",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller."""

    kind: IdentityKind
    name: str
    via: Literal["mtls", "token"]
    uri: str
    #: the stored bearer token's id (``via == "token"``), so a session can follow its revocation.
    token_id: int | None = None
    #: an operator's role (None for services and devices).
    role: OperatorRole | None = None

    @property
    def who(self) -> str:
        return self.uri if self.via == "mtls" else f"token:operator/{self.name}"

    def allows(self, needed: OperatorRole) -> bool:
        """Whether this caller is an operator whose role allows ``needed``."""
        return self.role is not None and self.role.allows(needed)

    def actor(self, request: Request) -> audit.Actor:
        return request_actor(
            self.who, request, role=self.role.value if self.role is not None else None
        )


def client_addr(request: Request) -> str | None:
    """The socket peer, ``host:port`` (never a forwarded header)."""
    return f"{request.client.host}:{request.client.port}" if request.client else None


def forwarded_for(request: Request) -> str | None:
    """The client address a trusted proxy forwarded, None when the peer is no trusted proxy.

    Only when the socket peer is in ``CERTFLEET_REGISTRY_TRUSTED_PROXIES``: then the
    rightmost ``X-Forwarded-For`` entry that is not itself a trusted proxy (each proxy appends
    the address it saw; what is left of it was written by the client and proves nothing).
    A malformed entry ends the walk: nothing is believed.
    """
    settings = request.app.state.registry.settings
    trusted = settings.trusted_proxies
    if not trusted or request.client is None or not _is_in(request.client.host, trusted):
        return None
    hops = [
        hop.strip()
        for header in request.headers.getlist("x-forwarded-for")
        for hop in header.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return None
        if not any(address in network for network in trusted):
            return str(address)
    return hops[0] if hops else None


def _is_in(host: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_host(request: Request) -> str:
    """The client's address for per-client limits: what a trusted proxy forwarded, else the
    socket peer's host."""
    return forwarded_for(request) or (request.client.host if request.client else "unknown")


def request_actor(who: str, request: Request, *, role: str | None = None) -> audit.Actor:
    """The audit log's actor ``who`` calling through ``request``: peer and forwarded address,
    and an operator's ``role``."""
    return audit.Actor(who, client_addr(request), forwarded_for(request), role=role)


def refuse(
    request: Request,
    metrics: RegistryMetrics,
    code: int,
    reason: str,
    message: str,
    identity: str = "-",
) -> HTTPException:
    """Log and count one refusal; return the HTTPException to raise."""
    metrics.auth_refusals.labels(reason).inc()
    log.warning(
        "request refused status=%d reason=%s method=%s path=%s identity=%s from=%s",
        code,
        reason,
        request.method,
        request.url.path,
        identity,
        client_addr(request) or "-",
    )
    headers = {"WWW-Authenticate": "Bearer"} if code == status.HTTP_401_UNAUTHORIZED else None
    error = "unauthenticated" if code == status.HTTP_401_UNAUTHORIZED else "forbidden"
    return HTTPException(code, detail={"error": error, "message": message}, headers=headers)


def caller_from_token(session: Session, token: str, trust_domain: str) -> Caller:
    """The operator a bearer token belongs to, or raise Refused (401)."""
    match = tokens.find_token(session, token)
    if match is None:
        raise Refused(401, "bad_token", "bearer token is unknown or revoked")
    if match.revoked:
        # Same answer as an unknown token; only the log line and the counter tell them apart.
        raise Refused(
            401,
            "revoked_token",
            "bearer token is unknown or revoked",
            f"token:operator/{match.operator}#{match.id}",
        )
    identity = Identity(trust_domain, IdentityKind.OPERATOR, match.operator)
    return Caller(
        IdentityKind.OPERATOR, match.operator, "token", identity.uri, match.id, match.role
    )


def caller_from_certificate(
    der: bytes, trust_domain: str, revoked_issuers: IssuerRevocations
) -> Caller:
    """The identity of a verified client certificate (DER), or raise Refused: 401 when its
    issuing CA was revoked, 403 when it is no identity of ``trust_domain``."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        identity = read_identity(certificate)
        role = read_operator_role(certificate) if identity.kind is IdentityKind.OPERATOR else None
    except (IdentityError, ValueError) as exc:
        raise Refused(403, "bad_identity", f"client certificate refused: {exc}") from None
    revoked = revoked_issuers.revocation_of(certificate)
    if revoked is not None:
        raise Refused(
            401,
            "revoked_issuer",
            f"client certificate {identity.uri} (serial {serial_hex(certificate.serial_number)}) "
            f"refused: its {revoked.describe()}",
            identity.uri,
        )
    if identity.trust_domain != trust_domain:
        raise Refused(
            403,
            "foreign_trust_domain",
            f"identity {identity.uri} is outside trust domain {trust_domain}",
            identity.uri,
        )
    return Caller(identity.kind, identity.name, "mtls", identity.uri, role=role)


def authenticate(
    request: Request,
    session: Session,
    metrics: RegistryMetrics,
    trust_domain: str,
    revoked_issuers: IssuerRevocations,
) -> Caller:
    """The caller of ``request``, or raise 401/403 (logged and counted)."""
    header = request.headers.get("authorization")
    try:
        if header is not None:
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Refused(
                    401, "bad_authorization_header", "Authorization must be 'Bearer <token>'"
                )
            return caller_from_token(session, token, trust_domain)
        der = peer_certificate_der(request.scope)
        if der is None:
            raise Refused(
                401,
                "no_identity",
                "no client certificate and no bearer token: present an operator certificate "
                "or 'Authorization: Bearer <token>'",
            )
        return caller_from_certificate(der, trust_domain, revoked_issuers)
    except Refused as refused:
        raise refuse(
            request, metrics, refused.status, refused.reason, refused.message, refused.identity
        ) from None
