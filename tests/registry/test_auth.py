"""Who may call what: mTLS identities through uvicorn, bearer tokens, refusals counted."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from factory.ca import CertificateAuthority, write_issued
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.models import AuditLog
from registry.server import RegistryServer
from registry.store import audit, tokens
from tests.support.pki import ClientFiles, TestPKI, pem
from tests.support.registry_fixtures import Clients

TLS_REFUSED = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)


def refusals(registry: RegistryServer, reason: str) -> float:
    value = registry.state.metrics.registry.get_sample_value(
        "certfleet_registry_auth_refusals_total", {"reason": reason}
    )
    return value or 0.0


def make_token(registry: RegistryServer, operator: str) -> str:
    with Session(registry.state.engine) as session:
        return tokens.create_token(session, operator, audit.Actor(who="test"))


def test_request_without_identity_is_401_and_counted(
    anonymous: httpx.Client, registry: RegistryServer
) -> None:
    response = anonymous.get("/devices")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"]["error"] == "unauthenticated"
    assert refusals(registry, "no_identity") == 1


def test_public_endpoints_need_no_identity(anonymous: httpx.Client) -> None:
    assert anonymous.get("/healthz").json()["status"] == "ok"
    assert anonymous.get("/crl.pem").text.startswith("-----BEGIN X509 CRL-----")
    assert anonymous.get("/crl.der").headers["content-type"] == "application/pkix-crl"


def test_device_certificate_on_operator_endpoint_is_403(
    clients: Clients, registry: RegistryServer
) -> None:
    device = clients.of(IdentityKind.DEVICE, "dev-snoop")
    response = device.get("/devices")
    assert response.status_code == 403
    assert (
        "spiffe://fleet.test/device/dev-snoop may not call" in response.json()["detail"]["message"]
    )
    assert device.get("/revocations").status_code == 403
    assert device.get("/metrics").status_code == 403
    assert refusals(registry, "device_not_allowed") == 3


def test_service_reads_feed_and_metrics_but_not_operator_endpoints(clients: Clients) -> None:
    broker = clients.of(IdentityKind.SERVICE, "broker")
    assert broker.get("/revocations").status_code == 200
    assert "certfleet_registry_requests_total" in broker.get("/metrics").text
    assert broker.get("/devices").status_code == 403
    assert broker.get("/stats").status_code == 403
    assert broker.post("/devices/x/decommission", json={"reason": "r"}).status_code == 403


def test_only_the_factory_service_may_register(clients: Clients, pki: TestPKI) -> None:
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, "dev-fac"))
    body = {"certificate_pem": pem(issued)}
    assert clients.of(IdentityKind.SERVICE, "broker").post("/devices", json=body).status_code == 403
    assert (
        clients.of(IdentityKind.SERVICE, "factory").post("/devices", json=body).status_code == 201
    )


def test_operator_identity_from_the_tls_peer_certificate_reaches_the_audit_log(
    operator: httpx.Client, registry: RegistryServer, pki: TestPKI
) -> None:
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, "dev-audit"))
    operator.post("/devices", json={"certificate_pem": pem(issued)})
    operator.post("/devices/dev-audit/decommission", json={"reason": "audit me"})
    with Session(registry.state.engine) as session:
        entries = session.exec(select(AuditLog).order_by(AuditLog.id)).all()  # type: ignore[arg-type]
    assert [(e.who, e.action, e.target) for e in entries] == [
        ("spiffe://fleet.test/operator/alice", "register", "dev-audit"),
        ("spiffe://fleet.test/operator/alice", "decommission", "dev-audit"),
    ]
    assert entries[1].from_addr is not None and entries[1].from_addr.startswith("127.0.0.1:")
    assert entries[1].detail is not None and entries[1].detail["reason"] == "audit me"


def test_bearer_token_authenticates_an_operator(clients: Clients, registry: RegistryServer) -> None:
    token = make_token(registry, "automation")
    http = clients.make(token=token)
    assert http.get("/devices").status_code == 200
    assert http.get("/stats").status_code == 200


def test_unknown_or_malformed_token_is_401_even_with_a_certificate(
    clients: Clients, registry: RegistryServer, pki: TestPKI
) -> None:
    bad = clients.make(token="cfr_not-a-real-token")
    assert bad.get("/devices").status_code == 401
    assert refusals(registry, "bad_token") == 1
    with_cert = clients.make(pki.client(IdentityKind.OPERATOR, "alice"), token="wrong")
    assert with_cert.get("/devices").status_code == 401
    basic = clients.make()
    response = basic.get("/devices", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert response.status_code == 401
    assert refusals(registry, "bad_authorization_header") == 1


def test_revoked_token_is_refused(clients: Clients, registry: RegistryServer) -> None:
    from sqlalchemy import update

    from registry.models import ApiToken

    token = make_token(registry, "temp")
    http = clients.make(token=token)
    assert http.get("/devices").status_code == 200
    with Session(registry.state.engine) as session:
        session.execute(update(ApiToken).values(revoked=True))
        session.commit()
    assert http.get("/devices").status_code == 401
    assert refusals(registry, "revoked_token") == 1
    assert refusals(registry, "bad_token") == 0


def test_tokens_are_stored_hashed(registry: RegistryServer) -> None:
    from registry.models import ApiToken

    token = make_token(registry, "hashed")
    with Session(registry.state.engine) as session:
        stored = session.exec(select(ApiToken.token_sha256)).all()
    assert token not in stored
    assert all(len(value) == 64 for value in stored)


def test_client_certificate_from_a_foreign_ca_fails_the_handshake(
    clients: Clients, tmp_path: Path
) -> None:
    layout = DataLayout(tmp_path / "foreign")
    foreign = CertificateAuthority.init(layout, "fleet.test")
    issued = foreign.issue_client(foreign.identity(IdentityKind.OPERATOR, "mallory"))
    write_issued(issued, tmp_path / "m.crt", tmp_path / "m.key")
    http = clients.make(ClientFiles(tmp_path / "m.crt", tmp_path / "m.key", layout.root_cert, 0))
    with pytest.raises(
        TLS_REFUSED, match=r"(?i)alert|unknown ca|certificate|reset|closed|eof|disconnected"
    ):
        http.get("/devices")


def test_expired_client_certificate_fails_the_handshake(
    clients: Clients, pki: TestPKI, tmp_path: Path
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    issued = pki.ca.issue_client(
        pki.ca.identity(IdentityKind.OPERATOR, "old"),
        not_before=past - dt.timedelta(days=1),
        not_after=past,
    )
    write_issued(issued, tmp_path / "o.crt", tmp_path / "o.key")
    http = clients.make(
        ClientFiles(tmp_path / "o.crt", tmp_path / "o.key", pki.layout.root_cert, 0)
    )
    with pytest.raises(
        TLS_REFUSED, match=r"(?i)alert|expired|certificate|reset|closed|eof|disconnected"
    ):
        http.get("/devices")


def test_tls_below_1_2_is_refused(registry: RegistryServer, pki: TestPKI) -> None:
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client even try TLS 1.1
    context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    host, port = registry.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        pytest.raises(ssl.SSLError, match=r"(?i)version|protocol|alert"),
    ):
        context.wrap_socket(raw, server_hostname=host)
