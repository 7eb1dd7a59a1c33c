"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import Session, SQLModel

import registry.models  # noqa: F401
from registry.db import make_engine, migrate
from registry.settings import RegistrySettings


def test_migrations_match_the_models_and_rerun_cleanly(database_url: str, tmp_path: Path) -> None:
    engine = make_engine(RegistrySettings(data_dir=tmp_path, registry_database_url=database_url))
    try:
        migrate(engine)
        migrate(engine)  # idempotent: already at head
        with engine.connect() as connection:
            diff = compare_metadata(
                MigrationContext.configure(connection, opts={"compare_type": False}),
                SQLModel.metadata,
            )
            counters: dict[str, int] = dict(
                connection.execute(text("SELECT name, value FROM counter")).all()
            )
        assert diff == []
        assert counters == {"revocation_seq": 0, "crl_number": 0}
        assert {"device", "certificate", "revocation", "audit_log", "api_token", "counter"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


def test_sqlite_database_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = make_engine(RegistrySettings(data_dir=tmp_path))
    try:
        migrate(engine)
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 10_000
        assert (tmp_path / "registry.db").exists()
    finally:
        engine.dispose()


def test_0002_keeps_existing_tokens_and_adds_revoked_at(database_url: str, tmp_path: Path) -> None:
    from registry.store import tokens

    engine = make_engine(RegistrySettings(data_dir=tmp_path, registry_database_url=database_url))
    try:
        migrate(engine, "0001")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO api_token (operator, token_sha256, created_at, revoked) "
                    "VALUES ('old-op', :digest, CURRENT_TIMESTAMP, false)"
                ),
                {"digest": tokens.token_hash("cfr_from-before-0002")},
            )
        migrate(engine)
        with Session(engine) as session:
            assert tokens.operator_for_token(session, "cfr_from-before-0002") == "old-op"
            [token] = tokens.list_tokens(session)
        assert (token.operator, token.revoked, token.revoked_at) == ("old-op", False, None)
    finally:
        engine.dispose()
