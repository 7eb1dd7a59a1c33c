"""The PostgreSQL the registry tests use (127.0.0.1:5432, user postgres, trust auth)."""

from __future__ import annotations

import os

POSTGRES_ADMIN_URL = os.environ.get(
    "CERTFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def postgres_unreachable_reason() -> str | None:
    """Why PostgreSQL cannot be used (shown in the skip), or None when it answers."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3, autocommit=True):
            return None
    except Exception as exc:  # any failure to connect means "not reachable"
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {type(exc).__name__}: {exc}"


def reset_postgres(url: str) -> None:
    """Empty the database at ``url``: its public schema dropped and created again."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
