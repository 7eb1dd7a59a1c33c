"""Who is signed in to the console, and signing in and out under ``/ui``: by operator token
(failures rate-limited per client address) or by the operator client certificate the browser
presented; sign-out ends the session.

Every state-changing request is a POST carrying the session's CSRF token
(:func:`require_csrf`; the sign-in form: the sign-in cookie's value, double submit); a POST
whose ``Origin`` is another site is refused as well. The pages (:mod:`registry.console.routes`)
take :data:`CurrentUser` or :data:`ActingUser`; someone not signed in is sent here.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from fleetcore.clock import utcnow
from fleetcore.profile import IdentityKind
from registry.api.deps import StateDep
from registry.auth import (
    Caller,
    Refused,
    caller_from_certificate,
    caller_from_token,
    client_addr,
    client_host,
    request_actor,
)
from registry.console.render import CONSOLE_PREFIX, render
from registry.console.sessions import (
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    ConsoleUser,
    create_session,
    end_session,
    find_session,
    forget_attempt,
    same_secret,
    take_attempt,
)
from registry.errors import ConsoleRefusal, SigninRateLimitedError, SignInRequired
from registry.state import RegistryState
from registry.tls import peer_certificate_der

__all__ = ["ActingUser", "CurrentUser", "acting_user", "current_user", "require_csrf", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix=CONSOLE_PREFIX, include_in_schema=False)


# -- who is signed in ------------------------------------------------------------------------


def current_user(request: Request, state: StateDep) -> ConsoleUser:
    """The signed-in operator of this request's session cookie; SignInRequired otherwise."""
    cookie = request.cookies.get(SESSION_COOKIE)
    user = None
    if cookie:
        # Its own short session, like the API's caller check.
        with Session(state.engine) as db:
            user = find_session(db, cookie, utcnow())
    if user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target)
    return user


CurrentUser = Annotated[ConsoleUser, Depends(current_user)]


def acting_user(request: Request, state: StateDep, user: CurrentUser) -> ConsoleUser:
    """The signed-in operator, if their role allows acting on devices; else a 403 page."""
    if not user.may_act:
        log.warning(
            "console request refused reason=role path=%s operator=%s role=%s from=%s",
            request.url.path,
            user.operator,
            user.role,
            client_addr(request) or "-",
        )
        state.metrics.auth_refusals.labels("role_not_allowed").inc()
        raise ConsoleRefusal(
            403,
            f"Your role, {user.role}, may read but not act on devices: decommission and "
            "re-enroll need the operator role (an admin issues a certificate or token with it).",
        )
    return user


#: A signed-in operator whose role allows decommission and re-enroll.
ActingUser = Annotated[ConsoleUser, Depends(acting_user)]


def _check_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise ConsoleRefusal(403, f"Refused: this form was sent from another site ({origin}).")


def require_csrf(request: Request, state: RegistryState, user: ConsoleUser, token: str) -> None:
    """Refuse (403 page) a POST from another site or without the session's CSRF token."""
    _check_origin(request)
    if not same_secret(token or None, user.csrf_token):
        state.metrics.auth_refusals.labels("console_csrf").inc()
        log.warning(
            "console request refused reason=csrf path=%s operator=%s from=%s",
            request.url.path,
            user.operator,
            client_addr(request) or "-",
        )
        raise ConsoleRefusal(
            403,
            "Refused: the form's security token (CSRF) is missing or out of date. "
            "Reload the page and submit it again.",
        )


def _safe_next(next_url: str) -> str:
    """Only a path inside the console: never another site (``//host``) or scheme."""
    parts = urlsplit(next_url)
    if parts.scheme or parts.netloc or not next_url.startswith(CONSOLE_PREFIX + "/"):
        return CONSOLE_PREFIX + "/"
    return next_url


# -- sign-in and sign-out -------------------------------------------------------------------


def _operator_certificate(request: Request, state: RegistryState) -> Caller | Refused | None:
    """The identity of the client certificate this connection presented, if any."""
    der = peer_certificate_der(request.scope)
    if der is None:
        return None
    try:
        return caller_from_certificate(der, state.ca.trust_domain, state.revoked_issuers)
    except Refused as refused:
        return refused


def _certificate_refusal(certificate: Caller | Refused | None) -> str | None:
    """Why this certificate cannot sign in to the console (None: it can, or there is none)."""
    if isinstance(certificate, Refused):
        return certificate.message
    if certificate is not None and certificate.kind is not IdentityKind.OPERATOR:
        return (
            f"The certificate {certificate.uri} is a {certificate.kind.value} identity; "
            "only operators may sign in to the console."
        )
    return None


def _sign_in_page(
    request: Request,
    state: RegistryState,
    *,
    status_code: int = 200,
    error: str | None = None,
    notice: str | None = None,
    next_url: str = "",
) -> HTMLResponse:
    signin_token = request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(32)
    certificate = _operator_certificate(request, state)
    refusal = _certificate_refusal(certificate)
    response = render(
        request,
        "sign_in.html",
        status_code=status_code,
        title="Sign in",
        user=None,
        error=error,
        notice=notice,
        next_url=_safe_next(next_url) if next_url else "",
        csrf_token=signin_token,
        certificate=certificate if isinstance(certificate, Caller) and not refusal else None,
        certificate_refused=refusal,
    )
    response.set_cookie(
        SIGNIN_COOKIE,
        signin_token,
        max_age=3600,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@router.get("/sign-in", response_model=None)
def sign_in_form(
    request: Request, state: StateDep, next: str = "", signed_out: bool = False
) -> Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        with Session(state.engine) as db:
            if find_session(db, cookie, utcnow()) is not None:  # signed in already
                return RedirectResponse(_safe_next(next or CONSOLE_PREFIX + "/"), status_code=303)
    return _sign_in_page(
        request, state, next_url=next, notice="Signed out." if signed_out else None
    )


def _start_session(
    request: Request, state: RegistryState, caller: Caller, next_url: str
) -> RedirectResponse:
    lifetime = dt.timedelta(hours=state.settings.console_session_hours)
    with Session(state.engine) as db:
        cookie, user = create_session(
            db, caller, lifetime, utcnow(), request_actor(caller.who, request)
        )
    log.info(
        "console sign-in operator=%s via=%s from=%s",
        caller.name,
        caller.via,
        client_addr(request) or "-",
    )
    response = RedirectResponse(_safe_next(next_url or CONSOLE_PREFIX + "/"), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(lifetime.total_seconds()),
        expires=user.expires_at,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


def _check_signin_form(request: Request, csrf_token: str) -> None:
    _check_origin(request)
    if not same_secret(csrf_token or None, request.cookies.get(SIGNIN_COOKIE) or "\0"):
        raise ConsoleRefusal(
            403,
            "Refused: the sign-in form's security token (CSRF) is missing or out of date. "
            "Reload the sign-in page and try again.",
        )


def _refuse_sign_in(
    request: Request, state: RegistryState, reason: str, message: str, next_url: str, status: int
) -> HTMLResponse:
    state.metrics.auth_refusals.labels(f"console_{reason}").inc()
    log.warning("console sign-in refused reason=%s from=%s", reason, client_addr(request) or "-")
    return _sign_in_page(request, state, status_code=status, error=message, next_url=next_url)


@router.post("/sign-in", response_model=None)
def sign_in(
    request: Request,
    state: StateDep,
    token: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    """Sign in with an operator bearer token; failures per client address are rate-limited."""
    _check_signin_form(request, csrf_token)
    token = token.strip()
    if not token:
        return _sign_in_page(
            request, state, status_code=400, error="Enter your operator token.", next_url=next
        )
    settings = state.settings
    window = dt.timedelta(seconds=settings.console_signin_window_s)
    client = client_host(request)
    now = utcnow()
    with Session(state.engine) as db:
        try:
            attempt = take_attempt(db, client, now, window, settings.console_signin_max_failures)
        except SigninRateLimitedError as limited:
            response = _refuse_sign_in(request, state, "rate_limited", str(limited), next, 429)
            response.headers["Retry-After"] = str(limited.retry_after_s)
            return response
        try:
            caller = caller_from_token(db, token, state.ca.trust_domain)
        except Refused as refused:  # the attempt stays counted as a failure
            return _refuse_sign_in(
                request,
                state,
                refused.reason,
                "That operator token is unknown or revoked. Check it, or create one with "
                "'certfleet registry token create --operator NAME'.",
                next,
                401,
            )
        forget_attempt(db, attempt)
    return _start_session(request, state, caller, next)


@router.post("/sign-in/certificate", response_model=None)
def sign_in_with_certificate(
    request: Request,
    state: StateDep,
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    """Sign in with the operator client certificate the browser presented on this connection."""
    _check_signin_form(request, csrf_token)
    certificate = _operator_certificate(request, state)
    if certificate is None:
        return _refuse_sign_in(
            request,
            state,
            "no_identity",
            "Your browser presented no client certificate on this connection. Import your "
            "operator certificate into the browser, or sign in with a token.",
            next,
            401,
        )
    if isinstance(certificate, Refused):
        return _refuse_sign_in(
            request, state, certificate.reason, certificate.message, next, certificate.status
        )
    refusal = _certificate_refusal(certificate)
    if refusal is not None:
        reason = f"{certificate.kind.value}_not_allowed"
        return _refuse_sign_in(request, state, reason, refusal, next, 403)
    return _start_session(request, state, certificate, next)


@router.post("/sign-out", response_model=None)
def sign_out(
    request: Request,
    state: StateDep,
    user: CurrentUser,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    require_csrf(request, state, user, csrf_token)
    cookie = request.cookies.get(SESSION_COOKIE, "")
    with Session(state.engine) as db:
        end_session(db, cookie)
    log.info("console sign-out operator=%s from=%s", user.operator, client_addr(request) or "-")
    response = RedirectResponse(f"{CONSOLE_PREFIX}/sign-in?signed_out=1", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response
