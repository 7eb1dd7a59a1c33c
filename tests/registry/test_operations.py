"""registry.operations: the service functions every entry point calls (REST, console, CLI)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from cryptography import x509
from sqlalchemy.pool import QueuePool

from factory.ca import IssuedCertificate
from registry import operations
from registry.models import DecommissionRequest
from registry.server import RegistryServer
from registry.store import audit
from tests.support.pki import pem, unique_id
from tests.support.waits import wait_for

Mint = Callable[..., IssuedCertificate]


def test_decommission_device_commits_and_does_every_after_commit_effect(
    registry: RegistryServer, operator: httpx.Client, mint: Mint
) -> None:
    """Called directly (as the web console does): the feed moves, the metric counts, the
    CRL lists the serial with the reason code, and no pooled connection stays checked out."""
    state = registry.state
    device_id = unique_id()
    issued = mint(device_id)
    assert operator.post("/devices", json={"certificate_pem": pem(issued)}).status_code == 201
    generation = state.feed.generation
    before = state.metrics.registry.get_sample_value("certfleet_registry_decommissions_total")

    result = operations.decommission_device(
        state,
        device_id,
        DecommissionRequest(reason="stolen", reason_code="keyCompromise"),
        audit.Actor("spiffe://fleet.test/operator/console"),
    )

    assert result.status == "decommissioned"
    assert state.feed.generation > generation
    after = state.metrics.registry.get_sample_value("certfleet_registry_decommissions_total")
    assert after == (before or 0) + 1
    deadline = time.monotonic() + 10
    crl = x509.load_der_x509_crl(operator.get("/crl.der").content)
    while crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number) is None:
        assert time.monotonic() < deadline, "the CRL never listed the decommissioned serial"
        time.sleep(0.05)
        crl = x509.load_der_x509_crl(operator.get("/crl.der").content)
    pool = state.engine.pool
    assert isinstance(pool, QueuePool)
    # The signer is idle again and nothing else kept one (a connection the CRL's or the
    # feed's background work holds for a moment under load is given back).
    assert wait_for(lambda: pool.checkedout() == 0, 5), pool.checkedout()
    feed = operator.get("/revocations", params={"after": result.revocation_seq - 1}).json()
    assert feed["events"][0]["device_id"] == device_id


def test_decommission_refuses_a_reason_code_we_do_not_allow(
    operator: httpx.Client, mint: Mint
) -> None:
    """certificateHold (a decommission is final) and cACompromise (not a device's reason)
    are refused with 422 and nothing is revoked."""
    device_id = unique_id()
    assert (
        operator.post("/devices", json={"certificate_pem": pem(mint(device_id))}).status_code == 201
    )
    for code in ("certificateHold", "cACompromise", "removeFromCRL", "bogus"):
        response = operator.post(
            f"/devices/{device_id}/decommission", json={"reason": "x", "reason_code": code}
        )
        assert response.status_code == 422, code
    assert operator.get(f"/devices/{device_id}").json()["status"] == "active"
