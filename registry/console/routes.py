"""The console's pages under ``/ui``: sign-in and sign-out, fleet, devices, one device, its
decommission and the re-enrollment of a device whose certificates have all expired (through
``registry.operations``, the same functions as the REST routes).

Every state-changing request is a POST carrying the session's CSRF token (the sign-in form:
the sign-in cookie's value, double submit); a POST whose ``Origin`` is another site is
refused as well. Pages for someone not signed in redirect to the sign-in page.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from fleetcore.clock import utcnow
from fleetcore.profile import IdentityKind
from fleetcore.reasons import DEFAULT_REASON_CODE, REASON_CODES
from registry import operations
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
from registry.console.charts import weekly_histogram
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
from registry.errors import (
    AlreadyDecommissionedError,
    ConflictError,
    ConsoleRefusal,
    InvalidCSRError,
    NotFoundError,
    SigninRateLimitedError,
    SignInRequired,
)
from registry.models import (
    DEVICE_ID_PATTERN,
    DecommissionRequest,
    ReenrollRequest,
    ReenrollResult,
    Revocation,
)
from registry.state import RegistryState
from registry.store import console as queries
from registry.store.certificates import device_certificate
from registry.store.devices import get_device, list_devices
from registry.tls import peer_certificate_der

__all__ = ["ConsoleRefusal", "SignInRequired", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix=CONSOLE_PREFIX, include_in_schema=False)

PAGE_SIZE = 50
_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_SERIAL = re.compile(r"^[0-9a-f]{1,48}$")
STATUSES = ("active", "decommissioned")


# -- who is signed in ------------------------------------------------------------------------


def _current_user(request: Request, state: StateDep) -> ConsoleUser:
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


CurrentUser = Annotated[ConsoleUser, Depends(_current_user)]


def _acting_user(request: Request, state: StateDep, user: CurrentUser) -> ConsoleUser:
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
ActingUser = Annotated[ConsoleUser, Depends(_acting_user)]


def _check_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise ConsoleRefusal(403, f"Refused: this form was sent from another site ({origin}).")


def _require_csrf(request: Request, state: RegistryState, user: ConsoleUser, token: str) -> None:
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
    _require_csrf(request, state, user, csrf_token)
    cookie = request.cookies.get(SESSION_COOKIE, "")
    with Session(state.engine) as db:
        end_session(db, cookie)
    log.info("console sign-out operator=%s from=%s", user.operator, client_addr(request) or "-")
    response = RedirectResponse(f"{CONSOLE_PREFIX}/sign-in?signed_out=1", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


# -- fleet ----------------------------------------------------------------------------------


def _fleet_context(state: RegistryState) -> dict[str, Any]:
    with Session(state.engine) as db:
        overview = queries.fleet_overview(db, utcnow())
    return {
        "overview": overview,
        "histogram": weekly_histogram(overview.stats.expiries_per_week),
        "horizons": queries.EXPIRY_HORIZONS_DAYS,
        "now": utcnow(),
    }


@router.get("/", response_class=HTMLResponse)
def fleet(request: Request, state: StateDep, user: CurrentUser) -> HTMLResponse:
    return render(
        request, "fleet.html", title="Fleet", user=user, page="fleet", **_fleet_context(state)
    )


@router.get("/fleet/live", response_class=HTMLResponse)
def fleet_live(request: Request, state: StateDep, user: CurrentUser) -> HTMLResponse:
    """The fleet page's live part, fetched again every few seconds by console.js."""
    return render(request, "fleet_live.html", **_fleet_context(state))


# -- devices --------------------------------------------------------------------------------


def _parse_date(value: str) -> dt.datetime | None:
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return None
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


@router.get("/devices", response_class=HTMLResponse)
def devices(
    request: Request,
    state: StateDep,
    user: CurrentUser,
    q: str = "",
    status: str = "",
    expiring_before: str = "",
    cursor: str = "",
) -> HTMLResponse:
    """Devices by id prefix, status and expiry, one keyset page at a time."""
    q = q.strip()
    errors = []
    if not _PREFIX_PATTERN.fullmatch(q):
        errors.append("A device id prefix has at most 64 letters, digits, '.', '_' or '-'.")
    if status and status not in STATUSES:
        errors.append("Status is 'active', 'decommissioned' or any.")
    before = _parse_date(expiring_before) if expiring_before else None
    if expiring_before and before is None:
        errors.append("Expiring before is a date like 2027-01-31.")
    page = None
    if not errors:
        with Session(state.engine) as db:
            page = list_devices(
                db,
                status=status or None,
                expiring_before=before,
                limit=PAGE_SIZE,
                cursor=cursor or None,
                id_prefix=q or None,
            )
    filters = {"q": q, "status": status, "expiring_before": expiring_before}
    next_url = None
    if page is not None and page.next_cursor:
        query = urlencode({**{k: v for k, v in filters.items() if v}, "cursor": page.next_cursor})
        next_url = f"{CONSOLE_PREFIX}/devices?{query}"
    return render(
        request,
        "devices.html",
        status_code=400 if errors else 200,
        title="Devices",
        user=user,
        page="devices",
        errors=errors,
        filters=filters,
        statuses=STATUSES,
        result=page,
        next_url=next_url,
        paged=bool(cursor),
        now=utcnow(),
    )


def _device_context(state: RegistryState, device_id: str) -> dict[str, Any]:
    if not _DEVICE_ID.fullmatch(device_id):
        raise ConsoleRefusal(404, f"No device {device_id!r}: that is not a device id.")
    with Session(state.engine) as db:
        try:
            device = get_device(db, device_id)
        except NotFoundError:
            raise ConsoleRefusal(404, f"No device {device_id} is registered.") from None
        history = queries.device_history(db, device_id)
    now = utcnow()
    valid = any(c.status == "live" and c.not_after > now for c in device.certificates)
    return {
        "device": device,
        "history": history,
        "now": now,
        "needs_reenroll": device.status == "active" and not valid,
    }


def _decommission_notice(state: RegistryState, device_id: str, seq: str) -> str | None:
    """The outcome of a decommission (Post/Redirect/Get): shown only for a revocation of this
    device that exists, whatever the query says."""
    if not seq.isdigit() or len(seq) > 18:
        return None
    with Session(state.engine) as db:
        revocation = db.get(Revocation, int(seq))
    if revocation is None or revocation.device_id != device_id or revocation.kind != "decommission":
        return None
    return (
        f"{device_id} decommissioned: revocation #{revocation.seq} is in the feed, and the "
        "broker drops its session."
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(
    request: Request, state: StateDep, user: CurrentUser, device_id: str, decommissioned: str = ""
) -> HTMLResponse:
    context = _device_context(state, device_id)
    return render(
        request,
        "device.html",
        title=device_id,
        user=user,
        page="devices",
        notice=_decommission_notice(state, device_id, decommissioned) if decommissioned else None,
        **context,
    )


def _decommission_page(
    request: Request,
    state: RegistryState,
    user: ConsoleUser,
    device_id: str,
    *,
    status_code: int = 200,
    error: str | None = None,
    reason: str = "",
    reason_code: str = DEFAULT_REASON_CODE,
) -> HTMLResponse:
    return render(
        request,
        "decommission.html",
        status_code=status_code,
        title=f"Decommission {device_id}",
        user=user,
        page="devices",
        error=error,
        reason=reason,
        reason_code=reason_code,
        reason_codes=REASON_CODES,
        **_device_context(state, device_id),
    )


@router.get("/devices/{device_id}/decommission", response_class=HTMLResponse)
def decommission_form(
    request: Request, state: StateDep, user: ActingUser, device_id: str
) -> HTMLResponse:
    return _decommission_page(request, state, user, device_id)


@router.post("/devices/{device_id}/decommission", response_model=None)
def decommission(
    request: Request,
    state: StateDep,
    user: ActingUser,
    device_id: str,
    reason: Annotated[str, Form()] = "",
    reason_code: Annotated[str, Form()] = DEFAULT_REASON_CODE,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Decommission through ``registry.operations`` (the REST route's service function);
    done, 303 to the device's page showing the outcome (a reload does not post again)."""
    _require_csrf(request, state, user, csrf_token)
    reason = reason.strip()
    try:
        body = DecommissionRequest(reason=reason, reason_code=reason_code)  # type: ignore[arg-type]
    except ValidationError:
        return _decommission_page(
            request,
            state,
            user,
            device_id,
            status_code=400,
            error="Give a reason of 1 to 500 characters and one of the listed reason codes.",
            reason=reason,
            reason_code=reason_code if reason_code in REASON_CODES else DEFAULT_REASON_CODE,
        )
    if not _DEVICE_ID.fullmatch(device_id):
        raise ConsoleRefusal(404, f"No device {device_id!r}: that is not a device id.")
    actor = user.actor(request)
    try:
        result = operations.decommission_device(state, device_id, body, actor)
    except NotFoundError:
        raise ConsoleRefusal(404, f"No device {device_id} is registered.") from None
    except AlreadyDecommissionedError as exc:
        return _decommission_page(request, state, user, device_id, status_code=409, error=str(exc))
    return RedirectResponse(
        f"{CONSOLE_PREFIX}/devices/{device_id}?decommissioned={result.revocation_seq}",
        status_code=303,
    )


def _reenroll_page(
    request: Request,
    state: RegistryState,
    user: ConsoleUser,
    device_id: str,
    *,
    status_code: int = 200,
    error: str | None = None,
    csr_pem: str = "",
    result: ReenrollResult | None = None,
) -> HTMLResponse:
    return render(
        request,
        "reenroll.html",
        status_code=status_code,
        title=f"Re-enroll {device_id}",
        user=user,
        page="devices",
        error=error,
        csr_pem=csr_pem,
        result=result,
        **_device_context(state, device_id),
    )


def _issued_result(
    state: RegistryState, device_id: str, serial: str, repeated: bool
) -> ReenrollResult:
    """The certificate a re-enrollment issued, read back for the page after the redirect."""
    if not _SERIAL.fullmatch(serial):
        raise ConsoleRefusal(404, f"No certificate {serial!r}: that is not a serial number.")
    with Session(state.engine) as db:
        row = device_certificate(db, device_id, serial)
    if row is None:
        raise ConsoleRefusal(404, f"No certificate {serial} of {device_id} is registered.")
    return ReenrollResult(
        device_id=device_id,
        serial=row.serial,
        not_before=row.not_before,
        not_after=row.not_after,
        previous_serial=None,
        repeated=repeated,
        certificate_pem=row.certificate_pem,
        chain_pem=state.ca.chain_pem.decode(),
    )


@router.get("/devices/{device_id}/reenroll", response_class=HTMLResponse)
def reenroll_form(
    request: Request,
    state: StateDep,
    user: ActingUser,
    device_id: str,
    issued: str = "",
    repeated: bool = False,
) -> HTMLResponse:
    """The re-enrollment form; with ``issued`` (after the POST's redirect), its outcome."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ConsoleRefusal(404, f"No device {device_id!r}: that is not a device id.")
    result = _issued_result(state, device_id, issued, repeated) if issued else None
    return _reenroll_page(request, state, user, device_id, result=result)


@router.post("/devices/{device_id}/reenroll", response_model=None)
def reenroll(
    request: Request,
    state: StateDep,
    user: ActingUser,
    device_id: str,
    csr_pem: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Re-enroll through ``registry.operations`` (the REST route's service function); done,
    303 to the form's page showing the certificate (a reload does not post again)."""
    _require_csrf(request, state, user, csrf_token)
    if not _DEVICE_ID.fullmatch(device_id):
        raise ConsoleRefusal(404, f"No device {device_id!r}: that is not a device id.")
    try:
        body = ReenrollRequest(csr_pem=csr_pem.strip())  # the REST route's limits
    except ValidationError:
        return _reenroll_page(
            request,
            state,
            user,
            device_id,
            status_code=400,
            error="Paste the CSR made on the device (PEM, '-----BEGIN CERTIFICATE REQUEST-----').",
        )
    actor = user.actor(request)
    try:
        result = operations.reenroll_device(state, device_id, body.csr_pem, actor)
    except NotFoundError:
        raise ConsoleRefusal(404, f"No device {device_id} is registered.") from None
    except (InvalidCSRError, ConflictError) as exc:
        status = 400 if isinstance(exc, InvalidCSRError) else 409
        return _reenroll_page(
            request, state, user, device_id, status_code=status, error=str(exc), csr_pem=csr_pem
        )
    query = urlencode({"issued": result.serial, **({"repeated": "1"} if result.repeated else {})})
    return RedirectResponse(
        f"{CONSOLE_PREFIX}/devices/{device_id}/reenroll?{query}", status_code=303
    )
