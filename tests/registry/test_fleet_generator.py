"""bench/fleet_generator.py at a small size, on SQLite and PostgreSQL: the registry serves
the generated devices, its feed carries their revocations in order, and its CRL lists
exactly the generated revoked certificates."""

from __future__ import annotations

import httpx
from cryptography import x509

from bench.fleet_generator import FleetSpec, device_id, generate_fleet
from fleetcore.profile import IdentityKind, serial_hex
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.conftest import TestPKI
from tests.registry.conftest import tls_context

DEVICES = 500


def test_registry_serves_a_generated_fleet_and_its_crl_lists_the_revoked(
    pki: TestPKI, database_url: str
) -> None:
    fleet = generate_fleet(pki.ca, database_url, FleetSpec(DEVICES, real_certificates=True))
    revoked = set(fleet.revoked_serials)
    # about half superseded, a few percent decommissioned (seeded: the same every run)
    assert DEVICES * 0.4 < len(revoked) < DEVICES * 0.65
    assert 0 < len(fleet.decommissioned) < DEVICES * 0.08
    assert fleet.feed_head == len(revoked)  # one event per revoked certificate here

    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=database_url,
        telemetry_broker_addr=None,
    )
    operator = pki.client(IdentityKind.OPERATOR, "alice")
    with (
        RegistryServer(settings) as registry,
        httpx.Client(
            base_url=f"{registry.url}/api/v1", verify=tls_context(pki, operator), timeout=30
        ) as http,
    ):
        listed = http.get("/devices", params={"limit": 1000}).json()["devices"]
        assert len(listed) == DEVICES
        retired = http.get("/devices", params={"status": "decommissioned", "limit": 1000})
        assert sorted(d["device_id"] for d in retired.json()["devices"]) == sorted(
            fleet.decommissioned
        )
        device = http.get(f"/devices/{device_id(7)}")
        assert device.status_code == 200, device.text
        certificates = device.json()["certificates"]
        assert certificates and all(c["status"] in ("live", "revoked") for c in certificates)

        feed = http.get("/revocations", params={"after": 0, "kinds": "decommission,superseded"})
        events = feed.json()["events"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert feed.json()["head_seq"] == fleet.feed_head
        assert {s for e in events for s in e["serials"]} <= {serial_hex(s) for s in revoked}

        crl = x509.load_der_x509_crl(http.get("/crl.der").content)
        assert crl.is_signature_valid(pki.ca.issuing_cert.public_key())  # type: ignore[arg-type]
        assert {entry.serial_number for entry in crl} == revoked
