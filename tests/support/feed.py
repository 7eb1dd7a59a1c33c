"""Feed histories for tests: devices decommissioned in order, events and certificates aged."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import httpx
from sqlalchemy import update
from sqlmodel import Session, col

from factory.ca import IssuedCertificate
from fleetcore.clock import utcnow
from fleetcore.profile import serial_hex
from registry.db import write_transaction
from registry.models import Certificate, Revocation
from registry.server import RegistryServer

__all__ = ["age", "decommissioned"]

Mint = Callable[..., IssuedCertificate]


def age(registry: RegistryServer, device_ids: list[str], days: float = 60) -> None:
    """Make these devices' certificates expired and their feed events old (``days`` ago)."""
    then = utcnow() - dt.timedelta(days=days)
    with Session(registry.state.engine) as session, write_transaction(session):
        session.execute(
            update(Certificate)
            .where(col(Certificate.device_id).in_(device_ids))
            .values(not_before=then - dt.timedelta(days=1), not_after=then)
        )
        session.execute(
            update(Revocation)
            .where(col(Revocation.device_id).in_(device_ids))
            .values(revoked_at=then)
        )


def decommissioned(operator: httpx.Client, mint: Mint, ids: list[str]) -> dict[str, str]:
    """Register and decommission ``ids`` in order (feed events 1..n); device -> its serial."""
    serials = {}
    for device_id in ids:
        issued = mint(device_id)
        body = {"certificate_pem": issued.certificate_pem.decode()}
        assert operator.post("/devices", json=body).status_code in (200, 201)
        serials[device_id] = serial_hex(issued.certificate.serial_number)
    for device_id in ids:
        response = operator.post(f"/devices/{device_id}/decommission", json={"reason": "eol"})
        assert response.status_code == 200, response.text
    return serials
