"""Registry fixtures: a real HTTPS registry on 127.0.0.1:0, on SQLite and on PostgreSQL.

``database_url`` is parametrized: every test that uses ``registry`` runs on SQLite always,
and on PostgreSQL (127.0.0.1:5432, user postgres) when one is reachable; when it is not,
the PostgreSQL variant is skipped with the reason shown (``-ra``).
"""

from __future__ import annotations

import os
import ssl
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
from tests.conftest import ClientFiles, TestPKI

POSTGRES_ADMIN_URL = os.environ.get(
    "CERTFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _postgres_unreachable_reason() -> str | None:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3, autocommit=True):
            return None
    except Exception as exc:  # any failure to connect means "not reachable"
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the session (dropped afterwards); skips if none."""
    reason = _postgres_unreachable_reason()
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


def _reset_postgres(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a reset schema in the session's PostgreSQL db."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_database")
    _reset_postgres(url)
    return url


@pytest.fixture
def registry_settings(pki: TestPKI, database_url: str) -> RegistrySettings:
    return RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=database_url,
        registry_feed_poll_seconds=0.2,
        telemetry_broker_addr=None,
    )


@pytest.fixture
def registry(registry_settings: RegistrySettings) -> Iterator[RegistryServer]:
    with RegistryServer(registry_settings) as server:
        yield server


def tls_context(pki: TestPKI, client: ClientFiles | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


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


def pem(issued: IssuedCertificate) -> str:
    return issued.certificate_pem.decode()


def unique_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# The publishing registry fixture (``published``), shared by the publication listener's and
# ``certificate inspect``'s tests.
from tests.registry.publishing import published  # noqa: E402, F401
from tests.softhsm import softhsm  # noqa: E402, F401 (a fixture of the PKCS#11 tests)
