"""Operator roles in the console over real HTTPS (both databases): a viewer reads every page
but sees no Decommission or Re-enroll button and gets a 403 page from those routes; an
operator acts; a token session follows its token's role; the audit log names the role."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import httpx
from sqlmodel import Session, select

from factory.ca import IssuedCertificate, write_issued
from fleetcore.profile import IdentityKind, OperatorRole
from registry.models import ApiToken, AuditLog
from registry.server import RegistryServer
from registry.store import audit, tokens
from tests.conftest import ClientFiles, TestPKI
from tests.console.conftest import Console, csrf_of
from tests.registry.conftest import pem

Mint = Callable[..., IssuedCertificate]
MakeConsole = Callable[..., Console]


def _token(registry: RegistryServer, name: str, role: OperatorRole) -> str:
    with Session(registry.state.engine) as session:
        return tokens.create_token(session, name, audit.Actor(who="test"), role)


def _register(operator: httpx.Client, *issued: IssuedCertificate) -> None:
    body = {"devices": [{"certificate_pem": pem(c)} for c in issued]}
    assert operator.post("/devices/batch", json=body).status_code == 200


def _expired(mint: Mint, device_id: str) -> IssuedCertificate:
    now = dt.datetime.now(dt.UTC)
    return mint(
        device_id, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(hours=1)
    )


def test_a_viewer_sees_no_action_and_is_refused_them(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    _register(operator, mint("dev-view-1"), _expired(mint, "dev-view-2"))
    assert console.sign_in(_token(registry, "vicky", OperatorRole.VIEWER)).status_code == 303
    page = console.http.get("/ui/devices/dev-view-1")
    assert page.status_code == 200 and "role: viewer" in page.text
    assert "/decommission" not in page.text and "Decommission</button>" not in page.text
    expired_page = console.http.get("/ui/devices/dev-view-2")
    assert "No valid certificate." in expired_page.text and "/reenroll" not in expired_page.text
    for path in ("/ui/", "/ui/devices"):
        assert console.http.get(path).status_code == 200
    csrf = csrf_of(page.text)
    refused = [
        console.http.get("/ui/devices/dev-view-1/decommission"),
        console.http.post(
            "/ui/devices/dev-view-1/decommission", data={"reason": "x", "csrf_token": csrf}
        ),
        console.http.get("/ui/devices/dev-view-2/reenroll"),
        console.http.post(
            "/ui/devices/dev-view-2/reenroll", data={"csr_pem": "x", "csrf_token": csrf}
        ),
    ]
    for response in refused:
        assert response.status_code == 403
        assert "Your role, viewer, may read but not act on devices" in response.text
    assert operator.get("/devices/dev-view-1").json()["status"] == "active"


def test_an_operator_certificate_acts_and_the_audit_names_its_role(
    registry: RegistryServer,
    pki: TestPKI,
    console_factory: MakeConsole,
    operator: httpx.Client,
    mint: Mint,
) -> None:
    _register(operator, mint("dev-act-1"))
    issued = pki.ca.issue_client(
        pki.ca.identity(IdentityKind.OPERATOR, "otto"), role=OperatorRole.OPERATOR
    )
    write_issued(issued, pki.layout.client_cert("otto"), pki.layout.client_key("otto"))
    files = ClientFiles(
        pki.layout.client_cert("otto"), pki.layout.client_key("otto"), pki.layout.root_cert, 0
    )
    console = console_factory(files)
    form = console.http.get("/ui/sign-in")
    signed = console.http.post(
        "/ui/sign-in/certificate", data={"csrf_token": csrf_of(form.text), "next": ""}
    )
    assert signed.status_code == 303
    page = console.http.get("/ui/devices/dev-act-1")
    assert "role: operator" in page.text and "Decommission</button>" in page.text
    csrf = console.csrf("/ui/devices/dev-act-1/decommission")
    done = console.http.post(
        "/ui/devices/dev-act-1/decommission", data={"reason": "retired", "csrf_token": csrf}
    )
    assert done.status_code == 303  # Post/Redirect/Get
    assert done.headers["location"].startswith("/ui/devices/dev-act-1?decommissioned=")
    with Session(registry.state.engine) as session:
        entry = session.exec(
            select(AuditLog).where(
                AuditLog.action == "decommission", AuditLog.target == "dev-act-1"
            )
        ).one()
    assert entry.who == "console:operator/otto"
    assert entry.detail is not None and entry.detail["role"] == "operator"


def test_narrowing_a_token_narrows_its_console_session_at_once(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    _register(operator, mint("dev-narrow"))
    secret = _token(registry, "nora", OperatorRole.OPERATOR)
    assert console.sign_in(secret).status_code == 303
    assert "Decommission</button>" in console.http.get("/ui/devices/dev-narrow").text
    with Session(registry.state.engine) as session:
        row = session.exec(
            select(ApiToken).where(ApiToken.token_sha256 == tokens.token_hash(secret))
        ).one()
        row.role = OperatorRole.VIEWER.value
        session.add(row)
        session.commit()
    page = console.http.get("/ui/devices/dev-narrow")
    assert "role: viewer" in page.text and "Decommission</button>" not in page.text
    assert console.http.get("/ui/devices/dev-narrow/decommission").status_code == 403
