"""Typed dependencies every route declares: the session, the state, and who may call.

A route declares who may call it: ``CurrentViewer`` (any operator: reads),
``CurrentOperator`` (an operator whose role allows acting on devices), ``CurrentAdmin``
(tokens, roles, CA operations); an unprotected route is visible in its signature by having
none of these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from fleetcore.profile import IdentityKind, OperatorRole
from registry.auth import Caller, authenticate, refuse
from registry.state import RegistryState

__all__ = [
    "CurrentAdmin",
    "CurrentCaller",
    "CurrentOperator",
    "CurrentReader",
    "CurrentRegistrar",
    "CurrentViewer",
    "SessionDep",
    "StateDep",
]

#: The service allowed to register devices besides operators.
REGISTRAR_SERVICE = "factory"


async def get_state(request: Request) -> RegistryState:
    # async: resolved on the event loop, so an async route using only the state (/healthz)
    # never waits for a worker thread.
    state: RegistryState = request.app.state.registry
    return state


StateDep = Annotated[RegistryState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with Session(state.engine) as session:
        yield session


#: Closed when the endpoint function returns ("function" scope), not after the response and
#: its background tasks: a finished request never keeps a pooled connection.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


#: Declares the bearer scheme in the OpenAPI document (so /docs can "Authorize"); it decides
#: nothing: ``authenticate`` reads the header itself. The mutual TLS scheme is added beside it
#: by ``registry.console.docs``.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An operator token from 'certfleet registry token create' (cfr_...)",
)
BearerDeclared = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def get_caller(request: Request, state: StateDep, _bearer: BearerDeclared) -> Caller:
    # Its own short session: a bearer-token lookup must not keep a connection checked out
    # for the rest of the request (a long-poll of the feed lasts up to a minute).
    with Session(state.engine) as session:
        return authenticate(
            request, session, state.metrics, state.ca.trust_domain, state.revoked_issuers
        )


CurrentCaller = Annotated[Caller, Depends(get_caller)]


def _forbidden(request: Request, state: StateDep, caller: Caller, allowed: str) -> HTTPException:
    return refuse(
        request,
        state.metrics,
        403,
        f"{caller.kind.value}_not_allowed",
        f"{caller.uri} may not call this endpoint; it needs {allowed}",
        caller.uri,
    )


def _role_refusal(
    request: Request, state: StateDep, caller: Caller, needed: OperatorRole
) -> HTTPException:
    return refuse(
        request,
        state.metrics,
        403,
        "role_not_allowed",
        f"{caller.uri} acts as {caller.role}; this needs the {needed} role or above "
        "(an admin issues a certificate or token with it)",
        caller.uri,
    )


def _operator_with(needed: OperatorRole) -> Callable[..., Caller]:
    def dependency(request: Request, state: StateDep, caller: CurrentCaller) -> Caller:
        if caller.kind is not IdentityKind.OPERATOR:
            raise _forbidden(request, state, caller, f"an operator ({needed} or above)")
        if not caller.allows(needed):
            raise _role_refusal(request, state, caller, needed)
        return caller

    dependency.__name__ = f"get_{needed.value}"
    return dependency


get_viewer = _operator_with(OperatorRole.VIEWER)
get_operator = _operator_with(OperatorRole.OPERATOR)
get_admin = _operator_with(OperatorRole.ADMIN)


def get_reader(request: Request, state: StateDep, caller: CurrentCaller) -> Caller:
    if caller.kind not in (IdentityKind.OPERATOR, IdentityKind.SERVICE):
        raise _forbidden(request, state, caller, "an operator or a service")
    return caller


def get_registrar(request: Request, state: StateDep, caller: CurrentCaller) -> Caller:
    if caller.kind is IdentityKind.OPERATOR and not caller.allows(OperatorRole.OPERATOR):
        raise _role_refusal(request, state, caller, OperatorRole.OPERATOR)
    if caller.kind is IdentityKind.OPERATOR or (
        caller.kind is IdentityKind.SERVICE and caller.name == REGISTRAR_SERVICE
    ):
        return caller
    raise _forbidden(request, state, caller, f"an operator or service/{REGISTRAR_SERVICE}")


#: Any operator, whatever the role (reads).
CurrentViewer = Annotated[Caller, Depends(get_viewer)]
#: An operator whose role allows acting on devices (operator or admin).
CurrentOperator = Annotated[Caller, Depends(get_operator)]
#: An operator with the admin role (tokens, roles, CA operations).
CurrentAdmin = Annotated[Caller, Depends(get_admin)]
#: An operator or any service (the feed and metrics).
CurrentReader = Annotated[Caller, Depends(get_reader)]
#: An operator (operator role or above) or service/factory (registration).
CurrentRegistrar = Annotated[Caller, Depends(get_registrar)]
