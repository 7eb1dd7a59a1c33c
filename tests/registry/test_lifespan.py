"""The app's lifespan starts the telemetry ingest only when a broker address is set."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

import registry.telemetry
from registry.main import create_app
from registry.settings import RegistrySettings
from tests.support.pki import TestPKI


def run_app(app: FastAPI) -> int:
    """Run the app's lifespan around one request; return the request's status."""

    async def main() -> int:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                return (await http.get("/api/v1/healthz")).status_code

    return asyncio.run(main())


class FakeIngest:
    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


def test_lifespan_starts_and_stops_telemetry_ingest(
    pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[Any, Engine, Any]] = []
    ingest = FakeIngest()

    def fake_start(
        settings: RegistrySettings, engine: Engine, ca: Any = None, **_hooks: Any
    ) -> FakeIngest:
        started.append((settings, engine, ca))
        return ingest

    monkeypatch.setattr(registry.telemetry, "start_ingest", fake_start)
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_database_url=f"sqlite:///{tmp_path / 'r.db'}",
        telemetry_broker_addr="127.0.0.1:18883",
    )
    app = create_app(settings)
    assert run_app(app) == 200
    assert len(started) == 1
    assert started[0][1] is app.state.registry.engine
    assert started[0][2] is app.state.registry.ca  # renewal signs with the app's CA
    assert ingest.stopped


def test_lifespan_without_broker_starts_no_ingest(
    pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("ingest must not start without a broker address")

    monkeypatch.setattr(registry.telemetry, "start_ingest", refuse)
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_database_url=f"sqlite:///{tmp_path / 'r.db'}",
        telemetry_broker_addr=None,
    )
    assert run_app(create_app(settings)) == 200
