"""`certfleet registry enrollment-secret create` and `certfleet registry claims import`:
zero-touch enrollment's records, written straight into the registry database (as ``token
create`` does: run where the database is reachable)."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session

from fleetcore.duration import parse_duration
from fleetcore.errors import ConfigError
from fleetcore.profile import check_device_id
from registry.cli_options import DataDir
from registry.store.audit import Actor

__all__ = ["claims_app", "secret_app"]

secret_app = typer.Typer(
    help="One-time enrollment secrets (EST simpleenroll with HTTP Basic).", no_args_is_help=True
)
claims_app = typer.Typer(help="Claims of zero-touch enrollment.", no_args_is_help=True)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL (CERTFLEET_REGISTRY_DATABASE_URL; default SQLite in the data dir)",
    ),
]


def _actor() -> Actor:
    return Actor(who=f"cli:{getpass.getuser()}", from_addr="local")


@secret_app.command("create")
def secret_create(
    device: Annotated[str, typer.Option("--device", help="the device id the secret enrolls")],
    expires: Annotated[str, typer.Option(help="how long it may be used, e.g. 7d")] = "7d",
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a one-time enrollment secret for a new device and print it once (only its
    hash is stored). The device enrolls with HTTP Basic DEVICE:SECRET on simpleenroll."""
    from registry.cli import _open_engine
    from registry.store.claims import create_secret

    check_device_id(device)
    lifetime = parse_duration(expires, what="--expires")
    engine = _open_engine(data_dir, database_url)
    try:
        with Session(engine) as session:
            secret = create_secret(session, device, lifetime, _actor())
    finally:
        engine.dispose()
    typer.echo(secret)


@claims_app.command("import")
def claims_import(
    claim_json: Annotated[Path, typer.Argument(help="claims/<batch>/claim.json of the factory")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Record a claim minted without a registry URL (idempotent)."""
    from pydantic import ValidationError

    from registry.cli import _open_engine
    from registry.est.models import ClaimRegistration
    from registry.store.claims import record_claim

    try:
        registration = ClaimRegistration.model_validate(json.loads(claim_json.read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        raise ConfigError(f"{claim_json} is not a claim record: {exc}") from None
    engine = _open_engine(data_dir, database_url)
    try:
        with Session(engine) as session:
            created = record_claim(session, registration, _actor())
    finally:
        engine.dispose()
    typer.echo(f"claim {registration.batch}: {'recorded' if created else 'recorded already'}")
