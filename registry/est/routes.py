"""EST routes on the registry's HTTPS listener: ``/.well-known/est/`` and
``/.well-known/est/<label>/`` (RFC 7030 3.2.2; every label serves the one CA).

- ``GET cacerts``: the issuing and root CA certificates, certs-only PKCS#7, base64; anyone.
- ``GET csrattrs``: what our profile wants in a CSR (:func:`registry.est.wire.csr_attributes`).
- ``POST simpleenroll``: a claim certificate (TLS client auth) or HTTP Basic with a device
  id and its one-time enrollment secret.
- ``POST simplereenroll``: the device's current certificate (TLS client auth).

The listener asks for a client certificate without requiring one (operator routes refuse a
request without an identity themselves, :mod:`registry.api.deps`); the peer certificate
reaches the route through :class:`registry.tls.PeerCertH11Protocol`. Errors are
``text/plain`` with the status of :mod:`registry.est.errors`, as RFC 7030 4.2.3 describes.
``serverkeygen`` is not offered (the key is born on the device): it answers 501. With a
pre-enrollment webhook (:mod:`registry.est.webhook`: the registry's, and a claim's own) a
claim enrollment may also answer 202 with Retry-After (awaiting approval) or 503 (a webhook
gave no decision: fails closed).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from typing import Annotated, Any, Final

import anyio.to_thread
from cryptography import x509
from fastapi import APIRouter, FastAPI, Path, Request, Response
from fastapi.responses import PlainTextResponse

from fleetcore.profile import NAME_PATTERN, Identity, IdentityKind
from registry.auth import client_addr
from registry.errors import RegistryError
from registry.est import enroll
from registry.est.errors import (
    EnrollmentPendingError,
    EnrollmentRefusedError,
    EnrollmentWebhookError,
    EstRateLimitedError,
    EstUnauthorizedError,
    PayloadTooLargeError,
)
from registry.est.webhook import EnrollmentQuestion, PreEnrollmentWebhook
from registry.est.wire import (
    CSRATTRS_TYPE,
    MAX_BODY_BYTES,
    PKCS7_CERTS_ONLY_TYPE,
    PKCS7_TYPE,
    certs_only,
    csr_attributes,
    decode_csr_body,
)
from registry.renewal import CertificateRenewer
from registry.state import RegistryState
from registry.tls import peer_certificate_der

__all__ = ["EST_PREFIX", "install_est"]

log = logging.getLogger(__name__)

EST_PREFIX: Final = "/.well-known/est"
_REALM: Final = 'Basic realm="certfleet EST", charset="UTF-8"'
_BASE64: Final = {"Content-Transfer-Encoding": "base64"}

Label = Annotated[str, Path(pattern=NAME_PATTERN.pattern, max_length=64)]

router = APIRouter(prefix=EST_PREFIX, tags=["est"])

_TEXT: dict[str, Any] = {"content": {"text/plain": {}}}
_ENROLL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the certificate, certs-only PKCS#7, base64",
        "content": {PKCS7_CERTS_ONLY_TYPE: {}},
    },
    202: {"description": "awaiting approval (pre-enrollment webhook); Retry-After", **_TEXT},
    400: {"description": "not base64 DER, or a CSR refused", **_TEXT},
    401: {"description": "no credential", **_TEXT},
    403: {"description": "the credential does not allow it", **_TEXT},
    409: {"description": "enrolled already, or decommissioned", **_TEXT},
    413: {"description": "body too large", **_TEXT},
    429: {"description": "re-enrolled within the renewal interval", **_TEXT},
    503: {
        "description": "the database is unavailable, or the pre-enrollment webhook gave no "
        "decision (fails closed); retry after Retry-After",
        **_TEXT,
    },
}


def _state(request: Request) -> RegistryState:
    state: RegistryState = request.app.state.registry
    return state


def _error(request: Request, exc: RegistryError) -> PlainTextResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, EstUnauthorizedError):
        headers["WWW-Authenticate"] = _REALM
    if exc.status == 503:
        headers["Retry-After"] = "1"
    if isinstance(exc, EstRateLimitedError | EnrollmentPendingError | EnrollmentWebhookError):
        headers["Retry-After"] = str(exc.retry_after_s)
    log.warning(
        "est %s status=%d error=%s path=%s from=%s message=%s",
        "pending" if exc.status == 202 else "refused",
        exc.status,
        exc.code,
        request.url.path,
        client_addr(request) or "-",
        exc,
    )
    return PlainTextResponse(f"{exc}\n", status_code=exc.status, headers=headers)


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(
            f"request body of {declared} bytes exceeds {MAX_BODY_BYTES} bytes; a CSR is a "
            "few hundred bytes of base64"
        )
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > MAX_BODY_BYTES:
            raise PayloadTooLargeError(
                f"request body exceeds {MAX_BODY_BYTES} bytes; a CSR is a few hundred bytes"
            )
    return bytes(received)


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise EstUnauthorizedError("EST takes HTTP Basic (device id and enrollment secret)")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        raise EstUnauthorizedError("the Basic credentials are not base64 of id:secret") from None
    if not sep or not NAME_PATTERN.fullmatch(user) or not password:
        raise EstUnauthorizedError("HTTP Basic must carry <device id>:<enrollment secret>")
    return user, password


def _enrolled_response(enrolled: enroll.Enrolled) -> Response:
    return Response(
        certs_only([enrolled.certificate]),
        media_type=PKCS7_CERTS_ONLY_TYPE,
        headers=_BASE64,
    )


async def _answer(request: Request, work: Callable[[], enroll.Enrolled]) -> Response:
    try:
        enrolled = await anyio.to_thread.run_sync(work)
    except RegistryError as exc:
        return _error(request, exc)
    return _enrolled_response(enrolled)


def _claim_webhooks(
    request: Request, checked: enroll.ClaimEnrollment
) -> list[PreEnrollmentWebhook]:
    """The webhooks that decide ``checked``: the registry's, then the claim's own; each
    must allow it."""
    hooks: list[PreEnrollmentWebhook] = []
    registry_wide: PreEnrollmentWebhook | None = request.app.state.est_webhook
    if registry_wide is not None:
        hooks.append(registry_wide)
    if checked.webhook_url is not None:
        settings = _state(request).settings
        hooks.append(
            PreEnrollmentWebhook(
                checked.webhook_url,
                timeout_s=settings.registry_est_webhook_timeout_s,
                pending_retry_after_s=settings.registry_est_webhook_retry_after_s,
                label=f"claim {checked.batch}'s pre-enrollment webhook",
            )
        )
    return hooks


async def _claim_enroll(
    request: Request,
    state: RegistryState,
    claim_certificate: x509.Certificate,
    csr_der: bytes,
    from_addr: str | None,
) -> Response:
    """A claim enrollment: checked, then decided by the pre-enrollment webhooks (the
    registry's and the claim's own, if any), then issued; without a webhook all in one
    worker thread."""
    asks_registry_wide = request.app.state.est_webhook is not None

    def check_or_issue() -> enroll.ClaimEnrollment | enroll.Enrolled:
        checked = enroll.check_claim_enrollment(state, claim_certificate, csr_der)
        if asks_registry_wide or checked.webhook_url is not None:
            return checked
        return enroll.issue_claim_enrollment(state, checked, from_addr)

    try:
        outcome = await anyio.to_thread.run_sync(check_or_issue)
        if isinstance(outcome, enroll.Enrolled):
            return _enrolled_response(outcome)
        question = EnrollmentQuestion(
            outcome.device_id, outcome.hardware_serial, outcome.batch,
            outcome.claim_serial, from_addr,
        )  # fmt: skip
        for webhook in _claim_webhooks(request, outcome):
            await webhook.decide(question)
    except RegistryError as exc:
        return _error(request, exc)
    checked = outcome
    return await _answer(request, lambda: enroll.issue_claim_enrollment(state, checked, from_addr))


async def _peer(request: Request, state: RegistryState) -> tuple[Identity, x509.Certificate] | None:
    der = peer_certificate_der(request.scope)
    if der is None:
        return None
    # In a thread: the revoked-issuer check may read the database.
    return await anyio.to_thread.run_sync(
        lambda: enroll.client_identity(der, state.ca.trust_domain, state.revoked_issuers)
    )


async def _simpleenroll(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _body(request)
        peer = await _peer(request, state)
        basic = _basic(request)
        csr_der = decode_csr_body(body, request.headers.get("content-type"))
    except RegistryError as exc:
        return _error(request, exc)
    from_addr = client_addr(request)
    if peer is not None and peer[0].kind is IdentityKind.CLAIM:
        return await _claim_enroll(request, state, peer[1], csr_der, from_addr)
    if basic is not None:
        device_id, secret = basic
        return await _answer(
            request,
            lambda: enroll.enroll_with_secret(state, device_id, secret, csr_der, from_addr),
        )
    if peer is not None and peer[0].kind is IdentityKind.DEVICE:
        return _error(
            request,
            EnrollmentRefusedError(
                f"{peer[0].uri} is a device certificate: it re-enrolls (simplereenroll); "
                "simpleenroll takes a claim certificate or an enrollment secret"
            ),
        )
    if peer is not None:
        return _error(
            request, EnrollmentRefusedError(f"{peer[0].uri} may not enroll devices over EST")
        )
    return _error(
        request,
        EstUnauthorizedError(
            "simpleenroll needs a claim certificate (TLS client auth) or HTTP Basic with the "
            "device id and its enrollment secret"
        ),
    )


async def _simplereenroll(request: Request) -> Response:
    state = _state(request)
    renewer: CertificateRenewer = request.app.state.est_renewer
    try:
        body = await _body(request)
        peer = await _peer(request, state)
        csr_der = decode_csr_body(body, request.headers.get("content-type"))
        if peer is None:
            raise EstUnauthorizedError(
                "simplereenroll needs the device's current certificate (TLS client auth)"
            )
        identity, certificate = peer
        if identity.kind is IdentityKind.CLAIM:
            raise EnrollmentRefusedError(
                f"{identity.uri} is a claim certificate: it enrolls new devices "
                "(simpleenroll) only; re-enroll with the device's own certificate"
            )
        if identity.kind is not IdentityKind.DEVICE:
            raise EnrollmentRefusedError(f"{identity.uri} is not a device; nothing to re-enroll")
    except RegistryError as exc:
        return _error(request, exc)
    return await _answer(
        request, lambda: enroll.reenroll(state, renewer, identity, certificate, csr_der)
    )


def _cacerts(request: Request) -> Response:
    ca = _state(request).ca
    return Response(
        certs_only([ca.issuing_cert, ca.root_cert]), media_type=PKCS7_TYPE, headers=_BASE64
    )


def _csrattrs(request: Request) -> Response:
    return Response(csr_attributes(), media_type=CSRATTRS_TYPE, headers=_BASE64)


@router.get("/cacerts", response_class=Response)
def cacerts(request: Request) -> Response:
    """The CA certificates (issuing and root), certs-only PKCS#7, base64 (RFC 7030 4.1)."""
    return _cacerts(request)


@router.get("/{label}/cacerts", response_class=Response)
def cacerts_labelled(label: Label, request: Request) -> Response:
    """``cacerts`` under a label (every label serves the one CA)."""
    return _cacerts(request)


@router.get("/csrattrs", response_class=Response)
def csrattrs(request: Request) -> Response:
    """What a CSR must hold: EC P-256, ecdsa-with-SHA256, the device id (RFC 7030 4.5)."""
    return _csrattrs(request)


@router.get("/{label}/csrattrs", response_class=Response)
def csrattrs_labelled(label: Label, request: Request) -> Response:
    """``csrattrs`` under a label."""
    return _csrattrs(request)


@router.post("/simpleenroll", response_class=Response, responses=_ENROLL_RESPONSES)
async def simpleenroll(request: Request) -> Response:
    """First enrollment (RFC 7030 4.2.1): a claim certificate or an enrollment secret."""
    return await _simpleenroll(request)


@router.post("/{label}/simpleenroll", response_class=Response, responses=_ENROLL_RESPONSES)
async def simpleenroll_labelled(label: Label, request: Request) -> Response:
    """``simpleenroll`` under a label."""
    return await _simpleenroll(request)


@router.post("/simplereenroll", response_class=Response, responses=_ENROLL_RESPONSES)
async def simplereenroll(request: Request) -> Response:
    """Re-enrollment (RFC 7030 4.2.2) with the device's current certificate."""
    return await _simplereenroll(request)


@router.post("/{label}/simplereenroll", response_class=Response, responses=_ENROLL_RESPONSES)
async def simplereenroll_labelled(label: Label, request: Request) -> Response:
    """``simplereenroll`` under a label."""
    return await _simplereenroll(request)


_NO_SERVERKEYGEN: Final = (
    "serverkeygen is not offered here (RFC 7030 4.4 makes it optional): the device makes its "
    "own key and sends a CSR to simpleenroll\n"
)


# Not in the OpenAPI schema: an operation that is not offered is not part of the API.
@router.post(
    "/serverkeygen", response_class=PlainTextResponse, status_code=501, include_in_schema=False
)
@router.post(
    "/{label}/serverkeygen",
    response_class=PlainTextResponse,
    status_code=501,
    include_in_schema=False,
)
def serverkeygen(request: Request) -> PlainTextResponse:
    """Not offered: the private key is born on the device (501, RFC 7030 4.4 is optional)."""
    return PlainTextResponse(_NO_SERVERKEYGEN, status_code=501)


def install_est(app: FastAPI, state: RegistryState) -> None:
    """Mount the EST routes, with the renewer applying the renewal rules to re-enrollments."""
    settings = state.settings
    app.state.est_renewer = CertificateRenewer(
        state.ca,
        state.engine,
        min_interval_s=settings.registry_renewal_min_interval_s,
        max_attempts=settings.registry_renewal_max_attempts,
        lifetime=settings.renewal_lifetime,
        stagger=settings.renewal_stagger,
        instance=settings.instance_name,
    )
    app.state.est_webhook = (
        PreEnrollmentWebhook(
            settings.registry_est_webhook_url,
            timeout_s=settings.registry_est_webhook_timeout_s,
            pending_retry_after_s=settings.registry_est_webhook_retry_after_s,
        )
        if settings.registry_est_webhook_url
        else None
    )
    app.include_router(router)
