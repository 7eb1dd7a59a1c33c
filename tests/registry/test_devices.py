"""Registration, listing, get one, decommission: over real HTTPS on both databases."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import httpx

from factory.ca import CertificateAuthority, IssuedCertificate
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, serial_hex
from tests.support.pki import TestPKI, pem

Mint = Callable[..., IssuedCertificate]


def register(
    http: httpx.Client, issued: IssuedCertificate, hw: str | None = None
) -> httpx.Response:
    return http.post("/devices", json={"certificate_pem": pem(issued), "hardware_serial": hw})


def test_register_one_device_then_again_is_idempotent(operator: httpx.Client, mint: Mint) -> None:
    issued = mint("dev-1")
    first = register(operator, issued, "HW-0001")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["device_id"] == "dev-1"
    assert body["status"] == "active"
    assert body["hardware_serial"] == "HW-0001"
    assert body["certificates"] == [
        {
            "serial": serial_hex(issued.certificate.serial_number),
            "not_before": issued.certificate.not_valid_before_utc.isoformat().replace(
                "+00:00", "Z"
            ),
            "not_after": issued.certificate.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
            "status": "live",
            "revoked_at": None,
            "revocation_reason": None,
        }
    ]
    again = register(operator, issued, "HW-0001")
    assert again.status_code == 200
    assert again.json() == body


def test_batch_registration_counts_created_and_existing(operator: httpx.Client, mint: Mint) -> None:
    certs = [mint(f"batch-{i}") for i in range(5)]
    body = {
        "devices": [
            {"certificate_pem": pem(c), "hardware_serial": f"HWB-{i}"} for i, c in enumerate(certs)
        ]
    }
    assert operator.post("/devices/batch", json=body).json() == {"created": 5, "existing": 0}
    second = mint("batch-5")
    body["devices"].append({"certificate_pem": pem(second)})
    assert operator.post("/devices/batch", json=body).json() == {"created": 1, "existing": 5}


def test_second_certificate_for_a_device_is_added(operator: httpx.Client, mint: Mint) -> None:
    assert register(operator, mint("dev-renew")).status_code == 201
    assert register(operator, mint("dev-renew")).status_code == 201
    assert len(operator.get("/devices/dev-renew").json()["certificates"]) == 2


def test_serial_bound_to_another_device_is_a_conflict(operator: httpx.Client, mint: Mint) -> None:
    first = mint("dev-a")
    assert register(operator, first).status_code == 201
    clash = mint("dev-b", serial=first.certificate.serial_number)
    response = register(operator, clash)
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert detail["error"] == "conflict"
    assert "already registered to device dev-a" in detail["message"]
    assert operator.get("/devices/dev-b").status_code == 404


def test_hardware_serial_bound_to_another_device_is_a_conflict(
    operator: httpx.Client, mint: Mint
) -> None:
    assert register(operator, mint("dev-c"), "HW-SAME").status_code == 201
    response = register(operator, mint("dev-d"), "HW-SAME")
    assert response.status_code == 409
    assert (
        "hardware serial 'HW-SAME' is already bound to device dev-c"
        in response.json()["detail"]["message"]
    )


def test_conflicting_batch_writes_nothing(operator: httpx.Client, mint: Mint) -> None:
    assert register(operator, mint("dev-e"), "HW-E").status_code == 201
    batch = {
        "devices": [
            {"certificate_pem": pem(mint("dev-f")), "hardware_serial": "HW-F"},
            {"certificate_pem": pem(mint("dev-g")), "hardware_serial": "HW-E"},
        ]
    }
    response = operator.post("/devices/batch", json=batch)
    assert response.status_code == 409
    assert response.json()["detail"]["message"].startswith("devices[1]")
    assert operator.get("/devices/dev-f").status_code == 404


def test_certificate_from_a_foreign_ca_is_refused(
    operator: httpx.Client, tmp_path: object, pki: TestPKI
) -> None:
    from pathlib import Path

    foreign = CertificateAuthority.init(DataLayout(Path(str(tmp_path)) / "foreign"), "fleet.test")
    issued = foreign.issue_client(foreign.identity(IdentityKind.DEVICE, "dev-foreign"))
    response = register(operator, issued)
    assert response.status_code == 422
    assert response.json()["detail"]["error"] == "invalid_certificate"
    assert "not issued by this registry's issuing CA" in response.json()["detail"]["message"]


def test_garbage_pem_is_a_422_not_a_500(operator: httpx.Client) -> None:
    for garbage in ("hello", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        response = operator.post("/devices", json={"certificate_pem": garbage})
        assert response.status_code == 422, response.text
        assert response.json()["detail"]["error"] == "invalid_certificate"


def test_certificate_with_its_chain_is_refused(
    operator: httpx.Client, mint: Mint, pki: TestPKI
) -> None:
    chain = pem(mint("dev-chain")) + pki.ca.chain_pem.decode()
    response = operator.post("/devices", json={"certificate_pem": chain})
    assert response.status_code == 422
    assert "exactly one PEM certificate" in response.json()["detail"]["message"]


def test_operator_certificate_is_not_registered_as_a_device(
    operator: httpx.Client, pki: TestPKI
) -> None:
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.OPERATOR, "bob"))
    response = register(operator, issued)
    assert response.status_code == 422
    assert "is a operator, not a device" in response.json()["detail"]["message"]


def test_request_validation_refuses_bad_shapes(operator: httpx.Client, mint: Mint) -> None:
    assert operator.post("/devices", json={}).status_code == 422
    assert (
        operator.post(
            "/devices", json={"certificate_pem": pem(mint("x")), "hardware_serial": "has space"}
        ).status_code
        == 422
    )
    assert operator.post("/devices/batch", json={"devices": []}).status_code == 422
    too_many = {"devices": [{"certificate_pem": "x"}] * 1001}
    assert operator.post("/devices/batch", json=too_many).status_code == 422
    assert operator.get("/devices", params={"limit": 0}).status_code == 422
    assert operator.get("/devices/bad%20id").status_code == 422
    assert operator.get("/devices", params={"cursor": "%%%"}).status_code == 422


def test_list_devices_pages_with_a_cursor_and_filters(operator: httpx.Client, mint: Mint) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)
    batch = []
    for i in range(7):
        not_after = soon if i % 2 == 0 else None
        batch.append({"certificate_pem": pem(mint(f"list-{i}", not_after=not_after))})
    assert operator.post("/devices/batch", json={"devices": batch}).json()["created"] == 7

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = operator.get("/devices", params=params).json()
        seen += [d["device_id"] for d in page["devices"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"list-{i}" for i in range(7)]

    before = (soon + dt.timedelta(days=1)).isoformat()
    expiring = operator.get("/devices", params={"expiring_before": before}).json()
    assert [d["device_id"] for d in expiring["devices"]] == ["list-0", "list-2", "list-4", "list-6"]

    operator.post("/devices/list-1/decommission", json={"reason": "scrapped"})
    gone = operator.get("/devices", params={"status": "decommissioned"}).json()
    assert [d["device_id"] for d in gone["devices"]] == ["list-1"]
    active = operator.get("/devices", params={"status": "active", "limit": 1000}).json()
    assert "list-1" not in [d["device_id"] for d in active["devices"]]


def test_get_unknown_device_is_404(operator: httpx.Client) -> None:
    response = operator.get("/devices/nope")
    assert response.status_code == 404
    assert response.json() == {
        "detail": {"error": "not_found", "message": "device nope is not registered"}
    }


def test_decommission_revokes_every_live_certificate(operator: httpx.Client, mint: Mint) -> None:
    first, second = mint("dev-dc"), mint("dev-dc")
    register(operator, first)
    register(operator, second)
    response = operator.post("/devices/dev-dc/decommission", json={"reason": "stolen"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "decommissioned"
    assert body["decommissioned_at"] is not None
    assert {c["status"] for c in body["certificates"]} == {"revoked"}
    feed = operator.get("/revocations", params={"after": body["revocation_seq"] - 1}).json()
    (event,) = feed["events"]
    assert event["device_id"] == "dev-dc"
    assert sorted(event["serials"]) == sorted(
        serial_hex(c.certificate.serial_number) for c in (first, second)
    )
    assert event["reason"] == "stolen"


def test_decommissioning_twice_is_a_409(operator: httpx.Client, mint: Mint) -> None:
    register(operator, mint("dev-twice"))
    assert operator.post("/devices/dev-twice/decommission", json={"reason": "a"}).status_code == 200
    again = operator.post("/devices/dev-twice/decommission", json={"reason": "b"})
    assert again.status_code == 409
    assert again.json()["detail"]["error"] == "already_decommissioned"
    assert operator.get("/revocations").json()["head_seq"] == 1


def test_decommission_unknown_device_is_404(operator: httpx.Client) -> None:
    response = operator.post("/devices/ghost/decommission", json={"reason": "x"})
    assert response.status_code == 404
    assert operator.get("/revocations").json()["head_seq"] == 0


def test_decommissioned_device_gets_no_new_certificate(operator: httpx.Client, mint: Mint) -> None:
    old = mint("dev-dead")
    register(operator, old)
    operator.post("/devices/dev-dead/decommission", json={"reason": "eol"})
    assert register(operator, old).status_code == 200  # re-import of what it had: fine
    response = register(operator, mint("dev-dead"))
    assert response.status_code == 409
    assert "decommissioned" in response.json()["detail"]["message"]


def test_large_batch_reports_the_first_bad_certificate_by_index(
    operator: httpx.Client, mint: Mint
) -> None:
    """Batches are verified in parallel chunks; the error still names the right item."""
    good = pem(mint("par-0"))
    devices = [{"certificate_pem": good} for _ in range(100)]
    devices[66] = {"certificate_pem": "not a certificate"}
    devices[90] = {"certificate_pem": "not one either"}
    response = operator.post("/devices/batch", json={"devices": devices})
    assert response.status_code == 422
    assert response.json()["detail"]["message"].startswith("devices[66]: ")


def test_concurrent_overlapping_batches_all_succeed(clients: object, mint: Mint) -> None:
    """The same new devices sent by several clients at once: each certificate is created
    exactly once and nobody gets an error (PostgreSQL: the unique-constraint race is retried)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.registry_fixtures import Clients

    assert isinstance(clients, Clients)
    shared = [{"certificate_pem": pem(mint(f"overlap-{i}"))} for i in range(30)]
    callers = [clients.of(IdentityKind.OPERATOR, "alice") for _ in range(4)]

    def send(index: int) -> dict[str, int]:
        response = callers[index].post("/devices/batch", json={"devices": shared})
        assert response.status_code == 200, response.text
        result: dict[str, int] = response.json()
        return result

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(send, range(4)))
    assert sum(r["created"] for r in results) == 30
    assert sum(r["existing"] for r in results) == 90
