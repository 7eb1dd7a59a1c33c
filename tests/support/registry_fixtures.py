"""Registry fixtures, defined once and imported by the conftests of the folders using them:
a real HTTPS registry on 127.0.0.1:0, on SQLite and on PostgreSQL.

``database_url`` is parametrized: every test that uses ``registry`` runs on SQLite always,
and on PostgreSQL (127.0.0.1:5432, user postgres) when one is reachable; when it is not,
the PostgreSQL variant is skipped with the reason shown (``-ra``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from factory.ca import IssuedCertificate
from fleetcore.profile import IdentityKind
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.support.pki import ClientFiles, TestPKI
from tests.support.postgres import (
    POSTGRES_ADMIN_URL,
    postgres_unreachable_reason,
    reset_postgres,
)
from tests.support.sqlite import migrated_sqlite_url
from tests.support.tls import tls_context

__all__ = [
    "Clients",
    "anonymous",
    "clients",
    "database_url",
    "migrated_database_url",
    "mint",
    "operator",
    "postgres_database",
    "registry",
    "registry_settings",
]


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the session (dropped afterwards); skips if none."""
    reason = postgres_unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    name = f"certfleet_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a reset schema in the session's PostgreSQL db."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_database")
    reset_postgres(url)
    return url


@pytest.fixture
def migrated_database_url(database_url: str) -> str:
    """``database_url`` at the newest schema: SQLite copies the migrated template (the
    registry's own migrate then has nothing to do); PostgreSQL is migrated by the registry."""
    if database_url.startswith("sqlite:///"):
        return migrated_sqlite_url(Path(database_url.removeprefix("sqlite:///")))
    return database_url


@pytest.fixture
def registry_settings(pki: TestPKI, migrated_database_url: str) -> RegistrySettings:
    return RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=migrated_database_url,
        registry_feed_poll_seconds=0.2,
        telemetry_broker_addr=None,
    )


@pytest.fixture
def registry(registry_settings: RegistrySettings) -> Iterator[RegistryServer]:
    with RegistryServer(registry_settings) as server:
        yield server


@dataclass
class Clients:
    """HTTPS clients of one registry, one per kind of caller (closed after the test)."""

    pki: TestPKI
    url: str
    opened: list[httpx.Client]

    def make(self, client: ClientFiles | None = None, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        http = httpx.Client(
            base_url=f"{self.url}/api/v1",
            verify=tls_context(self.pki, client),
            headers=headers,
            timeout=30,
        )
        self.opened.append(http)
        return http

    def of(self, kind: IdentityKind, name: str) -> httpx.Client:
        return self.make(self.pki.client(kind, name))


@pytest.fixture
def clients(pki: TestPKI, registry: RegistryServer) -> Iterator[Clients]:
    made = Clients(pki, registry.url, [])
    yield made
    for http in made.opened:
        http.close()


@pytest.fixture
def operator(clients: Clients) -> httpx.Client:
    """An operator over mTLS (spiffe://fleet.test/operator/alice)."""
    return clients.of(IdentityKind.OPERATOR, "alice")


@pytest.fixture
def anonymous(clients: Clients) -> httpx.Client:
    return clients.make()


@pytest.fixture
def mint(pki: TestPKI) -> Callable[..., IssuedCertificate]:
    """Issue a device certificate: ``mint("dev-1")`` or ``mint("dev-1", serial=...)``."""

    def issue(device_id: str, **kwargs: object) -> IssuedCertificate:
        return pki.ca.issue_client(
            pki.ca.identity(IdentityKind.DEVICE, device_id),
            **kwargs,  # type: ignore[arg-type]
        )

    return issue
