"""Superseded certificates in the registry (SQLite and PostgreSQL): confirms, the grace, the
superseded feed event and its compatibility with followers older than event kinds, restart."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable

import httpx
import pytest
from sqlmodel import Session

from factory.ca import IssuedCertificate
from fleetcore.clock import utcnow
from fleetcore.profile import IdentityKind, serial_hex
from registry.renewal import RenewalRefused
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from registry.store.audit import Actor
from registry.store.supersede import confirm_certificate
from registry.supersede import Confirmer, parse_confirm
from tests.support.pki import TestPKI, pem, unique_id
from tests.support.registry_fixtures import Clients
from tests.support.waits import wait_for

Mint = Callable[..., IssuedCertificate]
ACTOR = Actor("spiffe://fleet.test/service/registry")


def _renewed_device(operator: httpx.Client, mint: Mint) -> tuple[str, str, str]:
    """A device with an older and a newer certificate, both registered: (id, old, new)."""
    device_id = unique_id()
    now = utcnow()
    old = mint(device_id, not_before=now - dt.timedelta(days=2))
    new = mint(device_id, not_before=now - dt.timedelta(minutes=1))
    for issued in (old, new):
        response = operator.post("/devices", json={"certificate_pem": pem(issued)})
        assert response.status_code == 201, response.text
    return (
        device_id,
        serial_hex(old.certificate.serial_number),
        serial_hex(new.certificate.serial_number),
    )


def _statuses(operator: httpx.Client, device_id: str) -> dict[str, tuple[str, str | None]]:
    body = operator.get(f"/devices/{device_id}").json()
    return {c["serial"]: (c["status"], c["revocation_reason"]) for c in body["certificates"]}


def _confirmer(registry: RegistryServer, grace_s: float) -> Confirmer:
    return Confirmer(
        registry.state.engine, ACTOR, grace=dt.timedelta(seconds=grace_s), on_scheduled=None
    )


@pytest.fixture
def registry_settings(registry_settings: RegistrySettings) -> RegistrySettings:
    return registry_settings.model_copy(update={"registry_supersede_check_s": 0.2})


def test_confirm_schedules_and_the_worker_revokes_after_the_grace(
    registry: RegistryServer, operator: httpx.Client, clients: Clients, mint: Mint
) -> None:
    device_id, old, new = _renewed_device(operator, mint)
    confirm = _confirmer(registry, 1.5)
    answer = confirm(device_id, json.dumps({"confirm": new.upper()}).encode())
    assert json.loads(answer) == {"confirmed": new}
    assert confirm(device_id, json.dumps({"confirm": new}).encode()) == answer  # idempotent
    assert _statuses(operator, device_id)[old] == ("live", None)

    broker = clients.of(IdentityKind.SERVICE, "broker")
    assert wait_for(lambda: _statuses(operator, device_id)[old] == ("revoked", "superseded"))
    assert _statuses(operator, device_id)[new] == ("live", None)
    assert operator.get(f"/devices/{device_id}").json()["status"] == "active"

    full = broker.get("/revocations", params={"kinds": "decommission,superseded"}).json()
    [event] = [e for e in full["events"] if e["device_id"] == device_id]
    assert (event["kind"], event["serials"], event["reason_code"]) == (
        "superseded",
        [old],
        "superseded",
    )
    assert set(event["not_after"]) == {old}
    # Followers that do not ask for kinds get decommissions only, and the cursor moves on.
    legacy = broker.get("/revocations").json()
    assert [e for e in legacy["events"] if e["device_id"] == device_id] == []
    assert legacy["last_seq"] == legacy["head_seq"] >= event["seq"]
    refused = broker.get("/revocations", params={"kinds": "decommission,bogus"})
    assert refused.status_code == 422 and "bogus" in refused.text

    audit = operator.get(f"/devices/{device_id}/audit").json()["entries"]
    assert {"confirm", "supersede"} <= {e["action"] for e in audit}


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b'{"confirm": 42}', "invalid_confirm"),
        (b"{not json", "invalid_confirm"),
        (b'{"confirm": "zz"}', "invalid_confirm"),
        (b'{"confirm": "' + b"a" * 300 + b'"}', "invalid_confirm"),
    ],
)
def test_malformed_confirms_are_refused(payload: bytes, error: str) -> None:
    with pytest.raises(RenewalRefused, match="confirm") as refused:
        parse_confirm(payload)
    assert refused.value.error == error


def test_confirm_refusals_name_what_is_wrong(
    registry: RegistryServer, operator: httpx.Client, mint: Mint
) -> None:
    device_id, old, new = _renewed_device(operator, mint)
    confirm = _confirmer(registry, 60)
    cases = [
        (device_id, old, "not_newest", "is not device"),
        (device_id, "abcdef", "unknown_serial", "has no certificate"),
        ("dev-never-registered", new, "unknown_device", "not registered"),
    ]
    for target, serial, error, message in cases:
        with pytest.raises(RenewalRefused, match=message) as refused:
            confirm(target, json.dumps({"confirm": serial}).encode())
        assert refused.value.error == error
    response = operator.post(f"/devices/{device_id}/decommission", json={"reason": "gone"})
    assert response.status_code == 200
    with pytest.raises(RenewalRefused, match="decommissioned") as refused:
        confirm(device_id, json.dumps({"confirm": new}).encode())
    assert refused.value.error == "device_decommissioned"


def test_decommission_within_the_grace_adds_no_superseded_event(
    registry: RegistryServer, operator: httpx.Client, clients: Clients, mint: Mint
) -> None:
    device_id, old, new = _renewed_device(operator, mint)
    _confirmer(registry, 0.5)(device_id, json.dumps({"confirm": new}).encode())
    response = operator.post(f"/devices/{device_id}/decommission", json={"reason": "stolen"})
    assert response.status_code == 200
    time.sleep(1.5)  # past the grace: the worker has run (every 0.2 s)
    broker = clients.of(IdentityKind.SERVICE, "broker")
    full = broker.get("/revocations", params={"kinds": "decommission,superseded"}).json()
    kinds = [e["kind"] for e in full["events"] if e["device_id"] == device_id]
    assert kinds == ["decommission"]
    statuses = _statuses(operator, device_id)
    assert statuses[old] == ("revoked", "cessationOfOperation")
    assert statuses[new] == ("revoked", "cessationOfOperation")


def test_a_scheduled_supersession_survives_a_registry_restart(
    registry_settings: RegistrySettings, pki: TestPKI, mint: Mint
) -> None:
    with RegistryServer(registry_settings) as first:
        operator = Clients(pki, first.url, []).of(IdentityKind.OPERATOR, "alice")
        device_id, old, new = _renewed_device(operator, mint)
        with Session(first.state.engine) as session:
            result = confirm_certificate(
                session, device_id, new, grace=dt.timedelta(seconds=2), actor=ACTOR
            )
        assert result.scheduled == [old]
        operator.close()
    # Stopped before the grace ended; a new process on the same database finishes the job.
    with RegistryServer(registry_settings) as second:
        operator = Clients(pki, second.url, []).of(IdentityKind.OPERATOR, "alice")
        try:
            assert _statuses(operator, device_id)[old] == ("live", None)
            assert wait_for(
                lambda: _statuses(operator, device_id)[old] == ("revoked", "superseded")
            )
            crl = operator.get("/crl.pem")
            assert crl.status_code == 200
        finally:
            operator.close()
