"""`certfleet registry` commands: serve, migrate, import, token create."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["app"]

app = typer.Typer(help="The registry: devices, revocation feed, CRL.", no_args_is_help=True)
token_app = typer.Typer(help="Operator bearer tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="data folder (CERTFLEET_DATA_DIR, default ./certfleet-data)"),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL (CERTFLEET_REGISTRY_DATABASE_URL; default SQLite in the data dir)",
    ),
]


@app.command()
def serve(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    addr: Annotated[
        str | None,
        typer.Option("--addr", help="host:port (CERTFLEET_REGISTRY_ADDR, default 127.0.0.1:8443)"),
    ] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option("--ready-file", help='write {"url", "pid"} here once listening'),
    ] = None,
    telemetry_broker: Annotated[
        str | None,
        typer.Option("--telemetry-broker", help="host:port of the broker to ingest telemetry from"),
    ] = None,
) -> None:
    """Serve the registry over HTTPS (migrating the database first)."""
    from registry.server import serve as run
    from registry.settings import load_settings

    settings = load_settings(
        data_dir=data_dir,
        registry_database_url=database_url,
        registry_addr=addr,
        telemetry_broker_addr=telemetry_broker,
    )
    run(settings, ready_file)


@app.command()
def migrate(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the registry database schema."""
    from registry.db import make_engine
    from registry.db import migrate as run_migrations
    from registry.settings import load_settings

    settings = load_settings(data_dir=data_dir, registry_database_url=database_url)
    engine = make_engine(settings)
    try:
        run_migrations(engine)
    finally:
        engine.dispose()
    typer.echo(f"registry schema up to date ({engine.url.render_as_string()})")


@app.command("import")
def import_manifest(
    manifest: Annotated[Path, typer.Argument(help="the factory's manifest.jsonl")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print counts as JSON")] = False,
) -> None:
    """Register every certificate of a factory manifest (idempotent)."""
    from registry.importer import import_manifest as run_import
    from registry.settings import load_settings

    settings = load_settings(data_dir=data_dir, registry_database_url=database_url)
    result = run_import(settings, manifest, who=f"cli:{getpass.getuser()}")
    if as_json:
        typer.echo(json.dumps(result.model_dump()))
    else:
        typer.echo(f"imported {manifest}: created={result.created} existing={result.existing}")


@token_app.command("create")
def token_create(
    operator: Annotated[str, typer.Option("--operator", help="operator name the token acts as")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a bearer token for OPERATOR and print it once (only its hash is stored)."""
    from sqlmodel import Session

    from factory.profile import check_name
    from registry import crud
    from registry.db import make_engine
    from registry.db import migrate as run_migrations
    from registry.settings import load_settings

    check_name(operator, "operator name")
    settings = load_settings(data_dir=data_dir, registry_database_url=database_url)
    engine = make_engine(settings)
    try:
        run_migrations(engine)
        with Session(engine) as session:
            token = crud.create_token(
                session, operator, crud.Actor(who=f"cli:{getpass.getuser()}", from_addr="local")
            )
    finally:
        engine.dispose()
    typer.echo(token)
