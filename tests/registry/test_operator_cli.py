"""`certfleet registry devices list|show|decommission|audit` against a real HTTPS registry,
and the audit endpoint behind `audit`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from sqlmodel import Session
from typer.testing import CliRunner

from factory.ca import IssuedCertificate, write_issued
from factory.errors import RegistrationError
from fleetcore.errors import ConfigError, RegistryCallError
from fleetcore.profile import IdentityKind
from registry.cli import app as registry_app
from registry.server import RegistryServer
from registry.store import audit, tokens
from tests.registry.publishing import Published
from tests.support.pki import TestPKI, pem, unique_id
from tests.support.registry_fixtures import Clients


def operator_files(pki: TestPKI, name: str, kind: IdentityKind = IdentityKind.OPERATOR) -> None:
    """``clients/<name>.crt|.key`` as ``certfleet ca issue-client --operator NAME`` writes."""
    issued = pki.ca.issue_client(pki.ca.identity(kind, name))
    write_issued(issued, pki.layout.client_cert(name), pki.layout.client_key(name))


def run(pki: TestPKI, registry: RegistryServer, *args: str, **env: str) -> Result:
    return CliRunner().invoke(
        registry_app,
        ["devices", *args, "--data-dir", str(pki.layout.root), "--registry", registry.url],
        env={"CERTFLEET_REGISTRY_TOKEN": "", "CERTFLEET_REGISTRY_OPERATOR": "", **env},
    )


def token_for(registry: RegistryServer, operator: str) -> str:
    with Session(registry.state.engine) as session:
        return tokens.create_token(session, operator, audit.Actor(who="test"))


@pytest.fixture
def registered(operator: httpx.Client, mint: Callable[..., IssuedCertificate]) -> list[str]:
    ids = sorted(unique_id() for _ in range(3))
    for device_id in ids:
        response = operator.post(
            "/devices", json={"certificate_pem": pem(mint(device_id)), "hardware_serial": None}
        )
        assert response.status_code == 201, response.text
    return ids


def test_list_prints_a_table_and_pages_with_the_cursor(
    pki: TestPKI, registry: RegistryServer, registered: list[str]
) -> None:
    operator_files(pki, "alice")
    table = run(pki, registry, "list", "--operator", "alice")
    assert table.exit_code == 0, table.output
    assert "DEVICE" in table.output and "STATUS" in table.output
    for device_id in registered:
        assert device_id in table.output

    first = run(pki, registry, "list", "--operator", "alice", "--limit", "1", "--json")
    page = json.loads(first.output)
    assert [d["device_id"] for d in page["devices"]] == [registered[0]]
    text = run(pki, registry, "list", "--operator", "alice", "--limit", "1")
    assert f"more: --cursor {page['next_cursor']}" in text.output
    second = run(
        pki,
        registry,
        "list",
        "--operator",
        "alice",
        "--limit",
        "1",
        "--json",
        "--cursor",
        page["next_cursor"],
    )
    assert [d["device_id"] for d in json.loads(second.output)["devices"]] == [registered[1]]


def test_show_prints_the_device_and_its_certificates(
    pki: TestPKI, registry: RegistryServer, registered: list[str], operator: httpx.Client
) -> None:
    device_id = registered[0]
    token = token_for(registry, "bob")
    shown = run(pki, registry, "show", device_id, CERTFLEET_REGISTRY_TOKEN=token)
    assert shown.exit_code == 0, shown.output
    serial = operator.get(f"/devices/{device_id}").json()["certificates"][0]["serial"]
    assert device_id in shown.output and serial in shown.output and "live" in shown.output
    as_json = run(pki, registry, "show", device_id, "--json", "--token", token)
    assert json.loads(as_json.output) == operator.get(f"/devices/{device_id}").json()


def test_decommission_then_audit_shows_who_did_what(
    pki: TestPKI, registry: RegistryServer, registered: list[str], operator: httpx.Client
) -> None:
    device_id = registered[1]
    token = token_for(registry, "carol")
    done = run(
        pki,
        registry,
        "decommission",
        device_id,
        "--reason",
        "stolen",
        CERTFLEET_REGISTRY_TOKEN=token,
    )
    assert done.exit_code == 0, done.output
    assert f"decommissioned {device_id}: revoked " in done.output
    assert operator.get(f"/devices/{device_id}").json()["status"] == "decommissioned"

    again = run(pki, registry, "decommission", device_id, "--reason", "twice", "--token", token)
    assert again.exit_code != 0
    assert isinstance(again.exception, RegistryCallError)
    assert "HTTP 409" in str(again.exception) and "already decommissioned" in str(again.exception)

    audit = run(pki, registry, "audit", device_id, "--json", "--token", token)
    entries = json.loads(audit.output)["entries"]
    assert [e["action"] for e in entries] == ["decommission", "register"]
    assert entries[0]["who"] == "token:operator/carol"
    assert entries[0]["detail"]["reason"] == "stolen"
    table = run(pki, registry, "audit", device_id, "--token", token)
    assert "decommission" in table.output and "token:operator/carol" in table.output


def test_decommission_passes_the_reason_code_to_the_registry(
    pki: TestPKI, registry: RegistryServer, registered: list[str]
) -> None:
    operator_files(pki, "alice")
    refused = run(
        pki,
        registry,
        "decommission",
        registered[2],
        "--reason",
        "x",
        "--reason-code",
        "notAReason",
        "--operator",
        "alice",
    )
    assert refused.exit_code != 0
    assert isinstance(refused.exception, RegistryCallError)
    assert "HTTP 422" in str(refused.exception) and "reason_code" in str(refused.exception)


def test_decommission_with_a_reason_code_is_recorded(
    pki: TestPKI, registry: RegistryServer, registered: list[str]
) -> None:
    operator_files(pki, "alice")
    device_id = registered[0]
    done = run(
        pki, registry, "decommission", device_id, "--reason", "key leaked",
        "--reason-code", "keyCompromise", "--operator", "alice",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    audit = json.loads(
        run(pki, registry, "audit", device_id, "--json", "--operator", "alice").output
    )
    assert audit["entries"][0]["detail"]["reason_code"] == "keyCompromise"


def test_a_service_certificate_is_refused_as_operator(
    pki: TestPKI, registry: RegistryServer, registered: list[str]
) -> None:
    operator_files(pki, "svc-not-operator", IdentityKind.SERVICE)
    refused = run(pki, registry, "list", "--operator", "svc-not-operator")
    assert isinstance(refused.exception, RegistryCallError)
    assert "HTTP 403" in str(refused.exception) and "only operators" in str(refused.exception)


def test_credentials_missing_or_wrong_are_one_clear_error(
    pki: TestPKI, registry: RegistryServer
) -> None:
    none = run(pki, registry, "list")
    assert isinstance(none.exception, ConfigError)
    assert "--token" in str(none.exception) and "--operator" in str(none.exception)
    missing = run(pki, registry, "list", "--operator", "nobody-here")
    assert isinstance(missing.exception, RegistrationError)
    assert "certfleet ca issue-client --operator nobody-here" in str(missing.exception)
    bad_token = run(pki, registry, "list", "--token", "cfr_not-a-token")
    assert isinstance(bad_token.exception, RegistryCallError)
    assert "HTTP 401" in str(bad_token.exception)


def test_unreachable_registry_is_one_line_from_the_console_script(
    pki: TestPKI, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "registry",
            "devices",
            "list",
            "--data-dir",
            str(pki.layout.root),
            "--registry",
            f"https://127.0.0.1:{port}",
            "--token",
            "cfr_x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certfleet: error: registry https://127.0.0.1:")
    assert "unreachable" in lines[0]


# -- the audit endpoint ----------------------------------------------------------------------


def test_audit_endpoint_pages_newest_first(
    clients: Clients, operator: httpx.Client, registered: list[str]
) -> None:
    device_id = registered[0]
    operator.post(f"/devices/{device_id}/decommission", json={"reason": "r"})
    first = operator.get(f"/devices/{device_id}/audit", params={"limit": 1}).json()
    assert [e["action"] for e in first["entries"]] == ["decommission"]
    assert first["next_cursor"]
    second = operator.get(
        f"/devices/{device_id}/audit", params={"limit": 1, "cursor": first["next_cursor"]}
    ).json()
    assert [e["action"] for e in second["entries"]] == ["register"]
    assert second["next_cursor"] is None


def test_audit_endpoint_is_for_operators_only(
    clients: Clients, anonymous: httpx.Client, registered: list[str]
) -> None:
    path = f"/devices/{registered[0]}/audit"
    assert anonymous.get(path).status_code == 401
    service = clients.of(IdentityKind.SERVICE, "broker")
    assert service.get(path).status_code == 403
    device = clients.of(IdentityKind.DEVICE, registered[0])
    assert device.get(path).status_code == 403


def test_audit_endpoint_refuses_unknown_devices_and_bad_cursors(
    operator: httpx.Client, registered: list[str]
) -> None:
    missing = operator.get("/devices/dev-never-registered/audit")
    assert missing.status_code == 404
    assert missing.json()["detail"]["error"] == "not_found"
    bad = operator.get(f"/devices/{registered[0]}/audit", params={"cursor": "abc"})
    assert bad.status_code == 422
    assert bad.json()["detail"]["error"] == "invalid_request"


def test_a_registry_with_a_foreign_certificate_is_a_tls_error(
    pki: TestPKI, published: Published
) -> None:
    refused = run(pki, published.registry, "list", "--token", "cfr_x")
    assert isinstance(refused.exception, RegistryCallError)
    assert "TLS to the registry" in str(refused.exception)
    assert "unable to get local issuer certificate" in str(refused.exception)
