"""The console's pages under ``/ui``: fleet, devices, one device, its decommission and the
re-enrollment of a device whose certificates have all expired (through
``registry.operations``, the same functions as the REST routes).

Who is signed in, sign-in and sign-out, and the CSRF check every state-changing POST makes
are :mod:`registry.console.signin`; pages for someone not signed in redirect to its sign-in
page.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from fleetcore.clock import utcnow
from fleetcore.reasons import DEFAULT_REASON_CODE, REASON_CODES
from registry import operations
from registry.api.deps import StateDep
from registry.console.charts import weekly_histogram
from registry.console.render import CONSOLE_PREFIX, render
from registry.console.sessions import ConsoleUser
from registry.console.signin import ActingUser, CurrentUser, require_csrf
from registry.errors import (
    AlreadyDecommissionedError,
    ConflictError,
    ConsoleRefusal,
    InvalidCSRError,
    NotFoundError,
    SignInRequired,
)
from registry.models import (
    DEVICE_ID_PATTERN,
    DecommissionRequest,
    ReenrollRequest,
    ReenrollResult,
    Revocation,
)
from registry.stale_while_revalidate import StaleWhileRevalidate
from registry.state import RegistryState
from registry.store import console as queries
from registry.store.certificates import device_certificate
from registry.store.devices import get_device, list_devices

__all__ = ["ConsoleRefusal", "SignInRequired", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix=CONSOLE_PREFIX, include_in_schema=False)

PAGE_SIZE = 50
_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_SERIAL = re.compile(r"^[0-9a-f]{1,48}$")
STATUSES = ("active", "decommissioned")


# -- fleet ----------------------------------------------------------------------------------


def _overview(state: RegistryState) -> queries.FleetOverview:
    with Session(state.engine) as db:
        return queries.fleet_overview(db, utcnow())


def _fleet_context(state: RegistryState) -> dict[str, Any]:
    """The fleet page's figures: computed per request while that is cheap; once it is not
    (a large fleet), the last ones, refreshed in the background when older than 5 s
    (:mod:`registry.stale_while_revalidate`)."""
    if state.fleet_overview is None:
        state.fleet_overview = StaleWhileRevalidate(lambda: _overview(state))
    overview = state.fleet_overview.get()
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
    require_csrf(request, state, user, csrf_token)
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
    require_csrf(request, state, user, csrf_token)
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
