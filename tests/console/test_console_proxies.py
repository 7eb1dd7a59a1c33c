"""Forwarded client addresses (issue 22, item 5), over real HTTPS on both databases:
``X-Forwarded-For`` counts only from the proxies the operator names; the audit log keeps the
socket peer in ``from_addr`` and what a trusted proxy said in ``forwarded_for``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError
from sqlmodel import Session, col, select

from factory.ca import IssuedCertificate
from registry.models import AuditLog
from registry.server import RegistryServer, uvicorn_config
from registry.settings import RegistrySettings
from registry.store.audit import device_audit
from tests.conftest import ClientFiles
from tests.console.conftest import Console, make_token
from tests.registry.publishing import Published, published  # noqa: F401  (fixture)

ConsoleAt = Callable[[str, ClientFiles | None], Console]


def _last_entry(server: RegistryServer, action: str) -> AuditLog:
    with Session(server.state.engine) as db:
        entry = db.exec(
            select(AuditLog).where(AuditLog.action == action).order_by(col(AuditLog.id).desc())
        ).first()
    assert entry is not None, f"no {action} entry in the audit log"
    return entry


def _sign_in_from(console: Console, token: str, forwarded: str) -> int:
    console.http.headers["X-Forwarded-For"] = forwarded
    return console.sign_in(token).status_code


def test_a_forged_header_from_loopback_gets_no_fresh_allowance_by_default(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(update={"console_signin_max_failures": 3})
    with RegistryServer(settings) as server:
        console = console_at(server.url, None)
        for i in range(3):
            assert _sign_in_from(console, "cfr_wrong", f"10.9.9.{i}") == 401
        # A new forged address each time: still the same client, 127.0.0.1, and limited.
        assert _sign_in_from(console, make_token(server), "10.9.9.200") == 429
        console.http.close()


def test_the_audit_records_the_socket_peer_not_a_forged_header(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    with RegistryServer(registry_settings) as server:
        console = console_at(server.url, None)
        assert _sign_in_from(console, make_token(server), "10.9.9.9") == 303
        console.http.close()
        entry = _last_entry(server, "console_sign_in")
        assert entry.from_addr is not None and entry.from_addr.startswith("127.0.0.1:")
        assert entry.forwarded_for is None


def test_a_named_proxy_s_forwarded_address_is_recorded_separately(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(
        update={"registry_trusted_proxies": "127.0.0.1", "console_signin_max_failures": 2}
    )
    with RegistryServer(settings) as server:
        token = make_token(server)
        console = console_at(server.url, None)
        assert _sign_in_from(console, token, "203.0.113.7") == 303
        entry = _last_entry(server, "console_sign_in")
        assert entry.from_addr is not None and entry.from_addr.startswith("127.0.0.1:")
        assert entry.forwarded_for == "203.0.113.7"
        # Behind the proxy each client has its own allowance: the proxy's address is not
        # one shared limit for everyone behind it.
        other = console_at(server.url, None)
        for _ in range(2):
            assert _sign_in_from(other, "cfr_wrong", "198.51.100.1") == 401
        assert _sign_in_from(other, token, "198.51.100.1") == 429
        assert _sign_in_from(console_at(server.url, None), token, "198.51.100.2") == 303
        console.http.close()
        other.http.close()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # The client wrote the left part; the proxy appended what it saw (rightmost).
        ("192.0.2.1, 203.0.113.9", "203.0.113.9"),
        # A chain of trusted proxies (127.0.0.0/8) is walked through to the client.
        ("192.0.2.1, 203.0.113.9, 127.0.0.5", "203.0.113.9"),
        # Anything malformed: nothing is believed.
        ("203.0.113.9, not-an-address", None),
    ],
)
def test_forwarded_chains_are_read_from_the_right(
    registry_settings: RegistrySettings, console_at: ConsoleAt, header: str, expected: str | None
) -> None:
    settings = registry_settings.model_copy(update={"registry_trusted_proxies": "127.0.0.0/8"})
    with RegistryServer(settings) as server:
        console = console_at(server.url, None)
        assert _sign_in_from(console, make_token(server), header) == 303
        console.http.close()
        assert _last_entry(server, "console_sign_in").forwarded_for == expected


@pytest.mark.parametrize(("trusted", "forwarded"), [("", None), ("127.0.0.1", "203.0.113.8")])
def test_rest_calls_record_the_peer_and_a_trusted_proxy_s_word(
    registry_settings: RegistrySettings,
    console_at: ConsoleAt,
    mint: Callable[..., IssuedCertificate],
    trusted: str,
    forwarded: str | None,
) -> None:
    settings = registry_settings.model_copy(update={"registry_trusted_proxies": trusted})
    with RegistryServer(settings) as server:
        api = console_at(server.url, None).http
        api.headers["Authorization"] = f"Bearer {make_token(server)}"
        api.headers["X-Forwarded-For"] = "203.0.113.8"
        issued = mint("dev-forwarded")
        registered = api.post(
            "/api/v1/devices", json={"certificate_pem": issued.certificate_pem.decode()}
        )
        assert registered.status_code == 201, registered.text
        response = api.post("/api/v1/devices/dev-forwarded/decommission", json={"reason": "lost"})
        api.close()
        assert response.status_code == 200, response.text
        entry = _last_entry(server, "decommission")
        assert entry.from_addr is not None and entry.from_addr.startswith("127.0.0.1:")
        assert entry.forwarded_for == forwarded
        audit = [e for e in _audit_api(server) if e["action"] == "decommission"]
        assert audit and audit[0]["forwarded_for"] == forwarded


def _audit_api(server: RegistryServer) -> list[dict[str, object]]:
    with Session(server.state.engine) as db:
        page = device_audit(db, "dev-forwarded")
    return [entry.model_dump() for entry in page.entries]


def test_no_listener_lets_uvicorn_read_forwarded_headers(published: Published) -> None:  # noqa: F811
    """uvicorn's default believes X-Forwarded-For from 127.0.0.1: both listeners turn it off."""
    registry = published.registry
    assert uvicorn_config(registry.settings, registry.app).proxy_headers is False
    assert registry.publication is not None
    assert registry.publication.config.proxy_headers is False


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    with pytest.raises(ValidationError, match="not an IP address or network"):
        RegistrySettings(registry_trusted_proxies="127.0.0.1, proxy.example")
    settings = RegistrySettings(registry_trusted_proxies=" 10.0.0.5 , 10.1.0.0/16,::1")
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.5/32", "10.1.0.0/16", "::1/128"]
