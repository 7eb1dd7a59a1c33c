"""`certfleet registry` commands: serve, migrate, import, feed-compact, token
create|list|revoke, and the operator's devices list|show|decommission|audit
(registry/operator_cli.py) and expiry-report (registry/expiry_cli.py)."""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from registry.cli_options import DataDir
from registry.enrollment_cli import claims_app, secret_app
from registry.expiry_cli import expiry_report
from registry.operator_cli import devices_app

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from registry.models import TokenInfo
    from registry.store.audit import Actor

__all__ = ["app"]

log = logging.getLogger(__name__)

app = typer.Typer(help="The registry: devices, revocation feed, CRL.", no_args_is_help=True)
token_app = typer.Typer(help="Operator bearer tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(devices_app, name="devices")
app.command("expiry-report")(expiry_report)
app.add_typer(secret_app, name="enrollment-secret")
app.add_typer(claims_app, name="claims")

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
    publish_addr: Annotated[
        str | None,
        typer.Option(
            "--publish-addr",
            help="host:port of the plain-HTTP CRL/OCSP listener "
            "(CERTFLEET_REGISTRY_PUBLISH_ADDR; default off)",
        ),
    ] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option("--ready-file", help='write {"url", "pid"} here once listening'),
    ] = None,
    telemetry_broker: Annotated[
        str | None,
        typer.Option("--telemetry-broker", help="host:port of the broker to ingest telemetry from"),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file",
            help="CA key passphrase: first line of this file (CERTFLEET_CA_PASSPHRASE_FILE)",
        ),
    ] = None,
    trusted_proxies: Annotated[
        str | None,
        typer.Option(
            "--trusted-proxies",
            help="reverse proxies whose X-Forwarded-For is believed, addresses or networks, "
            "comma-separated (CERTFLEET_REGISTRY_TRUSTED_PROXIES; default none)",
        ),
    ] = None,
) -> None:
    """Serve the registry over HTTPS (migrating the database first)."""
    from registry.server import serve as run
    from registry.settings import build_settings

    settings = build_settings(
        data_dir=data_dir,
        registry_database_url=database_url,
        registry_addr=addr,
        registry_publish_addr=publish_addr,
        telemetry_broker_addr=telemetry_broker,
        ca_passphrase_file=passphrase_file,
        registry_trusted_proxies=trusted_proxies,
    )
    run(settings, ready_file)


@app.command()
def migrate(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the registry database schema."""
    from registry.db import make_engine
    from registry.db import migrate as run_migrations
    from registry.settings import build_settings

    settings = build_settings(data_dir=data_dir, registry_database_url=database_url)
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
    from registry.settings import build_settings

    settings = build_settings(data_dir=data_dir, registry_database_url=database_url)
    result = run_import(settings, manifest, who=f"cli:{getpass.getuser()}")
    if as_json:
        typer.echo(json.dumps(result.model_dump()))
    else:
        typer.echo(f"imported {manifest}: created={result.created} existing={result.existing}")


@app.command("feed-compact")
def feed_compact(
    grace_days: Annotated[
        float,
        typer.Option(
            "--grace-days",
            min=0,
            help="remove events whose certificates all expired (and that were revoked) "
            "more than this long ago",
        ),
    ] = 30.0,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Compact the revocation feed: events of certificates long expired leave it, the others
    keep their sequence numbers; a follower below the new floor catches up from the feed's
    snapshot (upgrade brokers to a version that reads it first)."""
    import datetime as dt

    from sqlmodel import Session

    from fleetcore.clock import utcnow
    from fleetcore.profile import CLOCK_SKEW
    from registry.db import make_engine, write_transaction
    from registry.settings import build_settings
    from registry.store.audit import Actor, add_entry
    from registry.store.revocations import compact_feed

    settings = build_settings(data_dir=data_dir, registry_database_url=database_url)
    engine = make_engine(settings)
    older_than = utcnow() - CLOCK_SKEW - dt.timedelta(days=grace_days)
    try:
        with Session(engine) as session:
            result = compact_feed(session, older_than)
            with write_transaction(session):
                add_entry(
                    session,
                    Actor(f"cli:{getpass.getuser()}"),
                    "feed_compact",
                    "revocation-feed",
                    {
                        "removed": result.removed,
                        "floor": result.floor,
                        "older_than": str(older_than),
                    },
                )
    finally:
        engine.dispose()
    log.info(
        "revocation feed compacted removed=%d floor=%d head_seq=%d older_than=%s",
        result.removed,
        result.floor,
        result.head_seq,
        older_than.isoformat(),
    )
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result)))
    else:
        typer.echo(
            f"feed compacted: removed={result.removed} floor={result.floor} "
            f"head_seq={result.head_seq}"
        )


@token_app.command("create")
def token_create(
    operator: Annotated[str, typer.Option("--operator", help="operator name the token acts as")],
    role: Annotated[
        str,
        typer.Option(
            "--role", help="viewer (read), operator (act on devices) or admin (tokens, CA)"
        ),
    ] = "operator",
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a bearer token for OPERATOR with ROLE and print it once (only its hash is
    stored)."""
    from fleetcore.profile import OperatorRole, check_name
    from registry import operations

    check_name(operator, "operator name")
    operator_role = OperatorRole.parse(role)
    engine = _open_engine(data_dir, database_url)
    try:
        token = operations.create_token(engine, operator, _cli_actor(), operator_role)
    finally:
        engine.dispose()
    typer.echo(token)


def _cli_actor() -> Actor:
    """Who CLI token commands act as in the audit log: the local administrator (unix user)."""
    from registry.store.audit import Actor

    return Actor(who=f"cli:{getpass.getuser()}", from_addr="local")


def _open_engine(data_dir: Path | None, database_url: str | None) -> Engine:
    """The registry database's engine, migrated (the caller disposes of it)."""
    from registry.db import make_engine
    from registry.db import migrate as run_migrations
    from registry.settings import build_settings

    settings = build_settings(data_dir=data_dir, registry_database_url=database_url)
    engine = make_engine(settings)
    try:
        run_migrations(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _token_line(token: TokenInfo) -> str:
    state = f"revoked {token.revoked_at.isoformat()}" if token.revoked_at else "revoked"
    return (
        f"{token.id:>6}  {token.operator:<24}  {token.role:<8}  {token.created_at.isoformat()}  "
        f"{state if token.revoked else 'active'}"
    )


@token_app.command("list")
def token_list(
    operator: Annotated[
        str | None, typer.Option("--operator", help="only this operator's tokens")
    ] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON array")] = False,
) -> None:
    """List bearer tokens: id, operator, created_at, revoked (never the token or its hash)."""
    from sqlmodel import Session

    from registry.store.tokens import list_tokens

    engine = _open_engine(data_dir, database_url)
    try:
        with Session(engine) as session:
            tokens = list_tokens(session, operator)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps([token.model_dump(mode="json") for token in tokens]))
        return
    typer.echo(f"{'ID':>6}  {'OPERATOR':<24}  {'ROLE':<8}  {'CREATED_AT':<32}  STATUS")
    for token in tokens:
        typer.echo(_token_line(token))


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[
        int | None, typer.Argument(help="id of the token to revoke (see 'token list')")
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option("--operator", help="revoke every token of this operator instead"),
    ] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
) -> None:
    """Revoke TOKEN_ID, or all tokens of --operator; effective on the next request."""
    from registry import operations
    from registry.errors import InvalidRequestError

    if (token_id is None) == (operator is None):
        raise InvalidRequestError("give either TOKEN_ID or --operator NAME (exactly one)")
    actor = _cli_actor()
    engine = _open_engine(data_dir, database_url)
    try:
        outcome = operations.revoke_tokens(engine, actor, token_id=token_id, operator=operator)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "revoked": [token.id for token in outcome.revoked],
                    "already_revoked": [token.id for token in outcome.already_revoked],
                }
            )
        )
        return
    for token in outcome.revoked:
        typer.echo(f"revoked token {token.id} of operator {token.operator}")
    for token in outcome.already_revoked:
        typer.echo(f"token {token.id} of operator {token.operator} was already revoked")
