"""Fault tests reuse the registry fixtures (real HTTPS registry, SQLite and PostgreSQL)."""

from __future__ import annotations

from tests.registry.conftest import (  # noqa: F401  (fixtures, registered by import)
    clients,
    database_url,
    mint,
    operator,
    postgres_database,
    registry,
    registry_settings,
)
