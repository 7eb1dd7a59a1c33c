"""Registry fixtures: a real HTTPS registry on 127.0.0.1:0, on SQLite and on PostgreSQL.

``database_url`` is parametrized: every test that uses ``registry`` runs on SQLite always,
and on PostgreSQL (127.0.0.1:5432, user postgres) when one is reachable; when it is not,
the PostgreSQL variant is skipped with the reason shown (``-ra``).
"""

from __future__ import annotations

from tests.registry.publishing import published
from tests.softhsm import softhsm  # a fixture of the PKCS#11 tests
from tests.support.pki import pem, unique_id
from tests.support.postgres import POSTGRES_ADMIN_URL, reset_postgres
from tests.support.registry_fixtures import (
    Clients,
    anonymous,
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

# The publishing registry fixture (``published``) is shared by the publication listener's and
# ``certificate inspect``'s tests. The helpers live in tests.support; the names are re-exported
# so that older imports (``from tests.registry.conftest import pem``) keep working.
_reset_postgres = reset_postgres

__all__ = [
    "POSTGRES_ADMIN_URL",
    "Clients",
    "_reset_postgres",
    "anonymous",
    "clients",
    "database_url",
    "migrated_database_url",
    "mint",
    "operator",
    "pem",
    "postgres_database",
    "published",
    "registry",
    "registry_settings",
    "softhsm",
    "tls_context",
    "unique_id",
]
