"""Console fixtures: a real HTTPS registry (SQLite, and PostgreSQL when reachable), operator
tokens from the registry's own code, and an HTTPS client that signs in through the forms."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlmodel import Session

from fleetcore.profile import IdentityKind
from registry.server import RegistryServer
from registry.store import audit, tokens
from tests.support.pki import ClientFiles, TestPKI
from tests.support.registry_fixtures import (  # noqa: F401  (fixtures)
    clients,
    database_url,
    migrated_database_url,
    mint,
    operator,
    postgres_database,
    registry,
    registry_settings,
)
from tests.support.tls import tls_context

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def make_token(server: RegistryServer, name: str = "alice") -> str:
    """A bearer token for operator ``name``, made as ``certfleet registry token create`` does."""
    with Session(server.state.engine) as session:
        return tokens.create_token(session, name, audit.Actor(who="test"))


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


@dataclass
class Console:
    """An HTTPS client of one registry's console (cookies kept, redirects not followed)."""

    http: httpx.Client

    def sign_in(self, token: str) -> httpx.Response:
        form = self.http.get("/ui/sign-in")
        assert form.status_code == 200, form.text
        return self.http.post(
            "/ui/sign-in", data={"token": token, "csrf_token": csrf_of(form.text), "next": ""}
        )

    def csrf(self, path: str = "/ui/") -> str:
        page = self.http.get(path)
        assert page.status_code == 200, page.text
        return csrf_of(page.text)


MakeConsole = Callable[..., Console]


@pytest.fixture
def console_at(pki: TestPKI) -> Iterator[Callable[[str, ClientFiles | None], Console]]:
    """``console_at(url, client_files)``: a console client of any registry (closed after)."""
    opened: list[httpx.Client] = []

    def make(url: str, client: ClientFiles | None = None) -> Console:
        http = httpx.Client(base_url=url, verify=tls_context(pki, client), timeout=30)
        opened.append(http)
        return Console(http)

    yield make
    for http in opened:
        http.close()


@pytest.fixture
def console_factory(
    registry: RegistryServer,  # noqa: F811  (first: set up before, torn down after, the clients)
    console_at: Callable[[str, ClientFiles | None], Console],
) -> MakeConsole:
    """``console_factory(client_files=None)``: a console client of the ``registry`` fixture."""
    return lambda client=None: console_at(registry.url, client)


@pytest.fixture
def console(console_factory: MakeConsole) -> Console:
    return console_factory()


@pytest.fixture
def operator_files(pki: TestPKI) -> ClientFiles:
    return pki.client(IdentityKind.OPERATOR, "carol")
