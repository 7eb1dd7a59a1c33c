"""The CRL, public (Mosquitto ``crlfile``, EMQX, nginx fetch it)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from registry.api.deps import StateDep
from registry.api.routes import API_PREFIX

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["crl"])


@router.get(
    "/crl.pem",
    response_class=Response,
    responses={200: {"content": {"application/x-pem-file": {}}}},
)
def crl_pem(state: StateDep) -> Response:
    """The current CRL, PEM, signed by the issuing CA."""
    return Response(state.crl.current().pem, media_type="application/x-pem-file")


@router.get(
    "/crl.der", response_class=Response, responses={200: {"content": {"application/pkix-crl": {}}}}
)
def crl_der(state: StateDep) -> Response:
    """The current CRL, DER."""
    return Response(state.crl.current().der, media_type="application/pkix-crl")
