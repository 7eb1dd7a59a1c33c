"""Devices: register (one, batch), list, get one, decommission, re-enroll."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from registry import operations
from registry.api.deps import (
    CurrentOperator,
    CurrentRegistrar,
    CurrentViewer,
    SessionDep,
    StateDep,
)
from registry.api.routes import API_PREFIX
from registry.models import (
    DEVICE_ID_PATTERN,
    BatchRegistration,
    BatchResult,
    DecommissionRequest,
    DecommissionResult,
    DeviceList,
    DevicePublic,
    DeviceRegistration,
    ReenrollRequest,
    ReenrollResult,
    RenewNowRequest,
    RenewNowResult,
)
from registry.renew_now import renew_now as ask_renew_now
from registry.state import RegistryState
from registry.store import devices

__all__ = ["router"]

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])

DeviceId = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, max_length=64)]

_ERROR = {"description": "refused, with {'detail': {'error': code, 'message': text}}"}
_REFUSALS: dict[int | str, dict[str, Any]] = {401: _ERROR, 403: _ERROR}


def _parse(state: RegistryState, items: list[DeviceRegistration]) -> list[devices.Registration]:
    parsed = state.verifier.parse([item.certificate_pem for item in items])
    return [
        devices.Registration(certificate, item.hardware_serial)
        for certificate, item in zip(parsed, items, strict=True)
    ]


@router.post(
    "",
    response_model=DevicePublic,
    status_code=201,
    responses={200: {"description": "already registered"}, 409: _ERROR, 422: _ERROR, **_REFUSALS},
)
def register_device(
    body: DeviceRegistration,
    caller: CurrentRegistrar,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
) -> DevicePublic:
    """Register one device certificate (201 when new, 200 when already registered)."""
    (registration,) = _parse(state, [body])
    result = operations.register_devices(state, [registration], caller.actor(request))
    if not result.created:
        response.status_code = 200
    return devices.get_device(session, registration.certificate.device_id)


@router.post(
    "/batch", response_model=BatchResult, responses={409: _ERROR, 422: _ERROR, **_REFUSALS}
)
def register_batch(
    body: BatchRegistration,
    caller: CurrentRegistrar,
    state: StateDep,
    request: Request,
) -> BatchResult:
    """Register up to 1000 device certificates in one transaction (all or nothing)."""
    return operations.register_devices(state, _parse(state, body.devices), caller.actor(request))


@router.post(
    "/renew-now",
    response_model=RenewNowResult,
    responses={422: _ERROR, 503: _ERROR, **_REFUSALS},
)
def renew_now(
    body: RenewNowRequest, caller: CurrentOperator, state: StateDep, request: Request
) -> RenewNowResult:
    """Ask devices to renew at once (operator role): by id, or every active device on one
    issuing CA (``issuer``: its key id), e.g. to move them to a new issuing CA after a
    rollover. The notice goes over MQTT on each device's ``cert/issued`` topic."""
    ingest = getattr(request.app.state, "telemetry_ingest", None)
    notices = ingest.renew_now if ingest is not None and ingest.renewal is not None else None
    return ask_renew_now(state, notices, body, caller.actor(request))


@router.get("", response_model=DeviceList, responses={422: _ERROR, **_REFUSALS})
def list_devices(
    caller: CurrentViewer,
    session: SessionDep,
    status: Literal["active", "decommissioned"] | None = None,
    expiring_before: Annotated[
        dt.datetime | None,
        Query(description="only devices with a live certificate expiring before this time"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> DeviceList:
    """One page of devices ordered by id; pass ``next_cursor`` back for the next page."""
    if expiring_before is not None and expiring_before.tzinfo is None:
        expiring_before = expiring_before.replace(tzinfo=dt.UTC)
    return devices.list_devices(
        session, status=status, expiring_before=expiring_before, limit=limit, cursor=cursor
    )


@router.get("/{device_id}", response_model=DevicePublic, responses={404: _ERROR, **_REFUSALS})
def get_device(device_id: DeviceId, caller: CurrentViewer, session: SessionDep) -> DevicePublic:
    """A device with its certificates and what it last reported."""
    return devices.get_device(session, device_id)


@router.post(
    "/{device_id}/decommission",
    response_model=DecommissionResult,
    responses={404: _ERROR, 409: _ERROR, 503: _ERROR, **_REFUSALS},
)
def decommission(
    device_id: DeviceId,
    body: DecommissionRequest,
    caller: CurrentOperator,
    state: StateDep,
    request: Request,
) -> DecommissionResult:
    """Decommission a device: revoke every live certificate, append one feed event.

    A device already decommissioned is a 409 (``already_decommissioned``).
    """
    return operations.decommission_device(state, device_id, body, caller.actor(request))


@router.post(
    "/{device_id}/reenroll",
    response_model=ReenrollResult,
    status_code=201,
    responses={
        200: {"description": "the same CSR again: the certificate issued for it before"},
        404: _ERROR,
        409: _ERROR,
        422: _ERROR,
        503: _ERROR,
        **_REFUSALS,
    },
)
def reenroll(
    device_id: DeviceId,
    body: ReenrollRequest,
    caller: CurrentOperator,
    state: StateDep,
    request: Request,
    response: Response,
) -> ReenrollResult:
    """Issue a certificate for a device whose certificates have all expired, from a CSR
    made on the device (it cannot renew over MQTT: the broker refuses its handshake).

    The same CSR again is a 200 with the certificate it got before (an answer lost on the
    way). A device with a live certificate still valid is a 409 (``live_certificate``: it
    renews itself), a decommissioned one a 409 (``device_decommissioned``), a CSR the
    factory's checks refuse or one for another device a 422 (``invalid_csr``).
    """
    result = operations.reenroll_device(state, device_id, body.csr_pem, caller.actor(request))
    if result.repeated:
        response.status_code = 200
    return result
