"""Operator roles (issue 26) over REST and the operator CLI: a viewer reads and is refused
every change, an operator acts on devices and is refused token management, an admin may do
both; the role comes from the certificate's role extension or the token's row, and a
certificate or token without one acts as ``operator``. The audit log names the role."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest
from cryptography import x509
from sqlmodel import Session, col, select
from typer.testing import CliRunner, Result

from factory.ca import IssuedCertificate, write_issued
from fleetcore.errors import IdentityError, RegistryCallError
from fleetcore.profile import IdentityKind, OperatorRole, read_operator_role
from registry.cli import app as registry_app
from registry.models import ApiToken, AuditLog
from registry.server import RegistryServer
from registry.store import audit, tokens
from tests.conftest import ClientFiles, TestPKI
from tests.registry.conftest import Clients, pem, unique_id
from tests.support.processes import certfleet_in_process


def role_client(pki: TestPKI, name: str, role: OperatorRole | None) -> ClientFiles:
    """``clients/<name>.crt|.key``: an operator certificate with ``role`` (None: none)."""
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.OPERATOR, name), role=role)
    write_issued(issued, pki.layout.client_cert(name), pki.layout.client_key(name))
    return ClientFiles(
        pki.layout.client_cert(name),
        pki.layout.client_key(name),
        pki.layout.root_cert,
        issued.certificate.serial_number,
    )


def token_with(registry: RegistryServer, operator: str, role: OperatorRole | None) -> str:
    """A token with ``role``; None: a row as made before roles existed (role NULL)."""
    with Session(registry.state.engine) as session:
        token = tokens.create_token(
            session, operator, audit.Actor(who="test"), role or OperatorRole.OPERATOR
        )
        if role is None:
            row = session.exec(
                select(ApiToken).where(ApiToken.token_sha256 == tokens.token_hash(token))
            ).one()
            row.role = None
            session.add(row)
            session.commit()
    return token


def _register(http: httpx.Client, mint: Callable[..., IssuedCertificate]) -> httpx.Response:
    return http.post("/devices", json={"certificate_pem": pem(mint(unique_id()))})


def _device(admin: httpx.Client, mint: Callable[..., IssuedCertificate]) -> str:
    certificate = mint(unique_id())
    response = admin.post("/devices", json={"certificate_pem": pem(certificate)})
    assert response.status_code == 201, response.text
    return str(response.json()["device_id"])


def test_a_role_travels_in_the_operator_certificate(pki: TestPKI) -> None:
    for role in OperatorRole:
        issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.OPERATOR, "r"), role=role)
        assert read_operator_role(issued.certificate) is role
    legacy = pki.ca.issue_client(pki.ca.identity(IdentityKind.OPERATOR, "r"))
    assert read_operator_role(legacy.certificate) is OperatorRole.OPERATOR
    with pytest.raises(IdentityError, match="only an operator certificate carries a role"):
        pki.ca.issue_client(pki.ca.identity(IdentityKind.SERVICE, "s"), role=OperatorRole.ADMIN)


@pytest.mark.parametrize("via", ["certificate", "token"])
def test_a_viewer_reads_and_is_refused_every_change(
    pki: TestPKI,
    registry: RegistryServer,
    clients: Clients,
    mint: Callable[..., IssuedCertificate],
    via: str,
) -> None:
    admin = clients.make(role_client(pki, "adm-v", OperatorRole.ADMIN))
    device_id = _device(admin, mint)
    viewer = (
        clients.make(role_client(pki, "view-c", OperatorRole.VIEWER))
        if via == "certificate"
        else clients.make(token=token_with(registry, "view-t", OperatorRole.VIEWER))
    )
    for path in ("/devices", f"/devices/{device_id}", f"/devices/{device_id}/audit", "/stats"):
        assert viewer.get(path).status_code == 200, path
    refused = [
        viewer.post(f"/devices/{device_id}/decommission", json={"reason": "no"}),
        viewer.post(f"/devices/{device_id}/reenroll", json={"csr_pem": "x" * 100}),
        _register(viewer, mint),
        viewer.get("/tokens"),
        viewer.post("/tokens", json={"operator": "eve", "role": "admin"}),
    ]
    for response in refused:
        assert response.status_code == 403, response.text
        assert "acts as viewer" in response.json()["detail"]["message"]
    assert admin.get(f"/devices/{device_id}").json()["status"] == "active"


def test_an_operator_acts_on_devices_but_not_on_tokens(
    pki: TestPKI, registry: RegistryServer, clients: Clients, mint: Callable[..., IssuedCertificate]
) -> None:
    operator = clients.make(role_client(pki, "op-o", OperatorRole.OPERATOR))
    assert _register(operator, mint).status_code == 201
    device_id = _device(operator, mint)
    done = operator.post(f"/devices/{device_id}/decommission", json={"reason": "retired"})
    assert done.status_code == 200, done.text
    for response in (
        operator.get("/tokens"),
        operator.post("/tokens", json={"operator": "eve", "role": "admin"}),
        operator.post("/tokens/1/revoke"),
    ):
        assert response.status_code == 403, response.text
        assert "needs the admin role" in response.json()["detail"]["message"]
    with Session(registry.state.engine) as session:
        entry = session.exec(
            select(AuditLog).where(AuditLog.action == "decommission", AuditLog.target == device_id)
        ).one()
    assert entry.who.endswith("/operator/op-o") and entry.detail is not None
    assert entry.detail["role"] == "operator"


def test_an_admin_manages_tokens_with_roles_over_the_api(
    pki: TestPKI, registry: RegistryServer, clients: Clients, mint: Callable[..., IssuedCertificate]
) -> None:
    admin = clients.make(role_client(pki, "adm-a", OperatorRole.ADMIN))
    created = admin.post("/tokens", json={"operator": "vera", "role": "viewer"})
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "viewer"
    vera = clients.make(token=created.json()["token"])
    device_id = _device(admin, mint)
    assert vera.get(f"/devices/{device_id}").status_code == 200
    assert vera.post(f"/devices/{device_id}/decommission", json={"reason": "x"}).status_code == 403
    listed = {token["operator"]: token for token in admin.get("/tokens").json()}
    assert listed["vera"]["role"] == "viewer" and "token" not in listed["vera"]
    revoked = admin.post(f"/tokens/{listed['vera']['id']}/revoke")
    assert revoked.json()["revoked"] == [listed["vera"]["id"]]
    assert vera.get("/devices").status_code == 401
    with Session(registry.state.engine) as session:
        entries = session.exec(
            select(AuditLog)
            .where(col(AuditLog.action).in_(["token_create", "token_revoke"]))
            .order_by(col(AuditLog.id))
        ).all()
    assert [(e.action, (e.detail or {}).get("role")) for e in entries][-2:] == [
        ("token_create", "admin"),
        ("token_revoke", "admin"),
    ]
    assert admin.post("/tokens", json={"operator": "x", "role": "root"}).status_code == 422


def test_certificates_and_tokens_without_a_role_act_as_operator(
    pki: TestPKI, registry: RegistryServer, clients: Clients, mint: Callable[..., IssuedCertificate]
) -> None:
    legacy_cert = clients.make(role_client(pki, "old-cert", None))
    legacy_token = clients.make(token=token_with(registry, "old-token", None))
    for http in (legacy_cert, legacy_token):
        device_id = _device(http, mint)
        done = http.post(f"/devices/{device_id}/decommission", json={"reason": "old"})
        assert done.status_code == 200, done.text
        assert http.get("/tokens").status_code == 403


def _cli(pki: TestPKI, registry: RegistryServer, *args: str, token: str) -> Result:
    return CliRunner().invoke(
        registry_app,
        ["devices", *args, "--data-dir", str(pki.layout.root), "--registry", registry.url],
        env={"CERTFLEET_REGISTRY_TOKEN": token, "CERTFLEET_REGISTRY_OPERATOR": ""},
    )


def test_the_operator_cli_is_refused_what_the_role_may_not_do(
    pki: TestPKI, registry: RegistryServer, clients: Clients, mint: Callable[..., IssuedCertificate]
) -> None:
    admin = clients.make(role_client(pki, "adm-cli", OperatorRole.ADMIN))
    device_id = _device(admin, mint)
    viewer = token_with(registry, "view-cli", OperatorRole.VIEWER)
    shown = _cli(pki, registry, "show", device_id, token=viewer)
    assert shown.exit_code == 0 and device_id in shown.output
    refused = _cli(pki, registry, "decommission", device_id, "--reason", "x", token=viewer)
    error = refused.exception
    assert isinstance(error, RegistryCallError)
    assert "HTTP 403" in str(error) and "acts as viewer" in str(error)
    assert "only operators" not in str(error)
    # The console script: one line, exit 2.
    script = subprocess.run(
        [sys.executable, "-m", "certfleet.cli", "registry", "devices", "decommission", device_id]
        + ["--reason", "x", "--data-dir", str(pki.layout.root), "--registry", registry.url],
        env={"CERTFLEET_REGISTRY_TOKEN": viewer, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 2, script.stderr
    lines = script.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the operator role" in lines[0], script.stderr
    assert admin.get(f"/devices/{device_id}").json()["status"] == "active"


def test_issue_client_writes_the_role_and_refuses_a_bad_one(pki: TestPKI) -> None:
    layout = pki.layout
    cli = ["ca", "issue-client"]  # output and exit code only: in process
    made = certfleet_in_process(
        *cli, "--operator", "vic", "--role", "viewer", "--data-dir", str(layout.root), "--force"
    )
    assert made.returncode == 0, made.stderr
    certificate = x509.load_pem_x509_certificate(layout.client_cert("vic").read_bytes())
    assert read_operator_role(certificate) is OperatorRole.VIEWER
    for args, words in (
        (["--operator", "vic2", "--role", "root"], "role 'root' is not one of viewer, operator"),
        (["--service", "svc2", "--role", "admin"], "--role is for --operator certificates"),
    ):
        bad = certfleet_in_process(*cli, *args, "--data-dir", str(layout.root))
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr
