"""`certfleet registry token list|revoke` against a live registry: the CLI in its own process,
the registry serving real TLS clients from the same database (SQLite and PostgreSQL)."""

from __future__ import annotations

import getpass
import json

import pytest
from sqlmodel import Session, col, select

from registry.models import ApiToken, AuditLog
from registry.server import RegistryServer
from tests.registry.test_auth import make_token, refusals
from tests.registry.test_cli import certfleet
from tests.support.pki import TestPKI
from tests.support.registry_fixtures import Clients

TOKEN_FIELDS = {"id", "operator", "role", "created_at", "revoked", "revoked_at"}


@pytest.fixture
def token_cli(pki: TestPKI, database_url: str) -> list[str]:
    """The data-dir and database flags pointing the CLI at the served registry's database."""
    return ["--data-dir", str(pki.layout.root), "--database-url", database_url]


def _token_ids(registry: RegistryServer) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    with Session(registry.state.engine) as session:
        for row in session.exec(select(ApiToken).order_by(col(ApiToken.id))).all():
            assert row.id is not None
            ids.setdefault(row.operator, []).append(row.id)
    return ids


def test_token_list_shows_tokens_but_never_the_secret(
    registry: RegistryServer, token_cli: list[str]
) -> None:
    secrets = [make_token(registry, "ops"), make_token(registry, "bot")]
    with Session(registry.state.engine) as session:
        hashes = list(session.exec(select(ApiToken.token_sha256)).all())

    listed = json.loads(certfleet("registry", "token", "list", "--json", *token_cli).stdout)
    assert [(t["operator"], t["revoked"], t["revoked_at"]) for t in listed] == [
        ("ops", False, None),
        ("bot", False, None),
    ]
    assert all(set(token) == TOKEN_FIELDS for token in listed)
    only_bot = certfleet("registry", "token", "list", "--json", "--operator", "bot", *token_cli)
    assert [t["operator"] for t in json.loads(only_bot.stdout)] == ["bot"]
    table = certfleet("registry", "token", "list", *token_cli).stdout
    assert "ops" in table and "bot" in table and "active" in table
    for output in (json.dumps(listed), table):
        assert not any(secret in output for secret in secrets)
        assert not any(digest in output for digest in hashes)


def test_revoked_token_is_refused_at_once_counted_and_audited(
    registry: RegistryServer, clients: Clients, token_cli: list[str]
) -> None:
    revoked_secret = make_token(registry, "ops")
    kept_secret = make_token(registry, "ops")
    revoked_id, kept_id = _token_ids(registry)["ops"]
    revoked_http, kept_http = clients.make(token=revoked_secret), clients.make(token=kept_secret)
    assert revoked_http.get("/devices").status_code == 200  # a live keep-alive connection

    outcome = certfleet("registry", "token", "revoke", str(revoked_id), "--json", *token_cli)
    assert json.loads(outcome.stdout) == {"revoked": [revoked_id], "already_revoked": []}

    # The running registry refuses it on the next request, on the same connection.
    response = revoked_http.get("/devices")
    assert response.status_code == 401
    # The client learns no more than for an unknown token; the counter tells them apart.
    assert response.json()["detail"]["message"] == "bearer token is unknown or revoked"
    assert refusals(registry, "revoked_token") == 1
    assert refusals(registry, "bad_token") == 0
    assert kept_http.get("/devices").status_code == 200

    listed = json.loads(certfleet("registry", "token", "list", "--json", *token_cli).stdout)
    by_id = {token["id"]: token for token in listed}
    assert by_id[revoked_id]["revoked"] is True and by_id[revoked_id]["revoked_at"] is not None
    assert by_id[kept_id]["revoked"] is False

    again = certfleet("registry", "token", "revoke", str(revoked_id), *token_cli)
    assert f"token {revoked_id} of operator ops was already revoked" in again.stdout

    with Session(registry.state.engine) as session:
        entries = session.exec(
            select(AuditLog).where(AuditLog.action == "token_revoke").order_by(col(AuditLog.id))
        ).all()
    assert [(e.who, e.target, e.from_addr) for e in entries] == [
        (f"cli:{getpass.getuser()}", f"token/{revoked_id}", "local")
    ]
    assert entries[0].detail == {"operator": "ops", "selected_by": "id"}


def test_revoke_by_operator_revokes_all_of_its_tokens(
    registry: RegistryServer, clients: Clients, token_cli: list[str]
) -> None:
    ops_secrets = [make_token(registry, "ops"), make_token(registry, "ops")]
    other_secret = make_token(registry, "other")
    ids = _token_ids(registry)
    certfleet("registry", "token", "revoke", str(ids["ops"][0]), *token_cli)

    outcome = certfleet("registry", "token", "revoke", "--operator", "ops", "--json", *token_cli)
    assert json.loads(outcome.stdout) == {
        "revoked": [ids["ops"][1]],
        "already_revoked": [ids["ops"][0]],
    }
    for secret in ops_secrets:
        assert clients.make(token=secret).get("/devices").status_code == 401
    assert refusals(registry, "revoked_token") == 2
    assert clients.make(token=other_secret).get("/devices").status_code == 200
    with Session(registry.state.engine) as session:
        targets = session.exec(
            select(AuditLog.target).where(AuditLog.action == "token_revoke")
        ).all()
    assert sorted(targets) == sorted(f"token/{token_id}" for token_id in ids["ops"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["9999"], "no token with id 9999: see 'certfleet registry token list'"),
        (["--operator", "nobody"], "operator 'nobody' has no tokens"),
        ([], "give either TOKEN_ID or --operator NAME (exactly one)"),
        (["1", "--operator", "ops"], "give either TOKEN_ID or --operator NAME (exactly one)"),
    ],
)
def test_revoke_refuses_what_it_cannot_find_with_exit_2(
    registry: RegistryServer, token_cli: list[str], args: list[str], message: str
) -> None:
    make_token(registry, "ops")
    result = certfleet("registry", "token", "revoke", *args, *token_cli, check=False)
    assert result.returncode == 2
    assert f"certfleet: error: {message}" in result.stderr
    with Session(registry.state.engine) as session:
        assert not session.exec(select(ApiToken).where(col(ApiToken.revoked))).all()
