"""Planner statistics are refreshed after bulk registration (both databases)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from registry import planner
from registry.db import make_engine, migrate
from registry.settings import RegistrySettings


def test_statistics_are_refreshed_when_registrations_double(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planner, "MIN_GROWTH", 10)
    engine = make_engine(RegistrySettings(data_dir=tmp_path, registry_database_url=database_url))
    try:
        migrate(engine)
        stats = planner.PlannerStatistics(engine)
        runs: list[int] = []
        monkeypatch.setattr(planner, "analyze", lambda _engine: runs.append(1))
        for _ in range(8):
            stats.registered(5)  # 40 in all: analyses at 10, 20 and 40 (doubling)
            stats.join(5)
        assert len(runs) == 3
    finally:
        engine.dispose()


def test_analyze_runs_on_the_database(database_url: str, tmp_path: Path) -> None:
    engine = make_engine(RegistrySettings(data_dir=tmp_path, registry_database_url=database_url))
    try:
        migrate(engine)
        planner.analyze(engine)
        if engine.dialect.name == "sqlite":
            with engine.connect() as connection:
                found = connection.execute(
                    text("SELECT name FROM sqlite_master WHERE name = 'sqlite_stat1'")
                ).scalar()
            assert found == "sqlite_stat1"  # ANALYZE ran and stored its statistics table
    finally:
        engine.dispose()
