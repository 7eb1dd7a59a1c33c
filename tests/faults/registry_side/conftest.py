"""The registry's fault tests reuse the registry fixtures (a real HTTPS registry on SQLite
and PostgreSQL); a folder of their own, because tests/faults/conftest.py holds the broker
tests' fixtures of the same names (``registry``, ``operator``)."""

from __future__ import annotations

from tests.support.registry_fixtures import (  # noqa: F401  (fixtures, registered by import)
    clients,
    database_url,
    migrated_database_url,
    mint,
    operator,
    postgres_database,
    registry,
    registry_settings,
)
