"""Fault-injection fixtures: the registry tests' real HTTPS registry (SQLite and PostgreSQL)
and clients, and the broker tests' real broker."""

from __future__ import annotations

from tests.broker.conftest import broker  # noqa: F401  (fixtures, registered by import)
from tests.registry.conftest import (  # noqa: F401
    clients,
    database_url,
    mint,
    operator,
    postgres_database,
    registry,
    registry_settings,
)
