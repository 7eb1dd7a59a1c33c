"""``certfleet ca rollover``, ``ca issuers`` and ``ca retire``: the issuing CA over time
(issue 26, docs/factory.md "Issuing CA rollover").

These are local commands on the data folder that holds the CA: ``rollover`` needs the root
key, so only who holds it (an admin) can run it. ``issuers`` and ``retire`` read the
registry's database (``CERTFLEET_REGISTRY_DATABASE_URL``, default the data folder's
SQLite file) to count live certificates per issuing CA; an issuing CA is retired only when
none of its certificates is live.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from factory.ca import CertificateAuthority
from factory.errors import CAError
from factory.issuers import find_previous, issuer_key_id, read_certificate, retire_issuer
from factory.settings import build_settings
from fleetcore.clock import utcnow

__all__ = ["register"]

log = logging.getLogger(__name__)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Data folder (env CERTFLEET_DATA_DIR, default ./certfleet-data)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON result for scripts.")]


def _emit(as_json: bool, body: Any, text: str) -> None:
    typer.echo(json.dumps(body, indent=2) if as_json else text)


def _live_by_issuer(data_dir: Path | None) -> dict[str, int] | None:
    """Live certificates per issuing CA key id from the registry's database; None when
    there is no database to read."""
    from sqlmodel import Session

    from registry.db import make_engine
    from registry.settings import build_settings as registry_settings
    from registry.store.issuers import issuer_use

    settings = registry_settings(data_dir=data_dir)
    if not settings.registry_database_url and not settings.layout.registry_db.exists():
        return None
    engine = make_engine(settings)
    try:
        with Session(engine) as session:
            return dict(issuer_use(session, utcnow()).certificates)
    finally:
        engine.dispose()


def ca_rollover(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """Make a new issuing CA under the same root and make it current. The old one stays
    trusted (broker, registry, CRL, OCSP) until 'certfleet ca retire'; devices move to the
    new one at their next renewal, or at once with 'certfleet registry devices renew-now'."""
    settings = build_settings(data_dir=data_dir)
    ca = CertificateAuthority.load(settings.layout, passphrase=settings.passphrase)
    old = ca.issuing_cert
    new = ca.rollover(passphrase=settings.passphrase)
    log.info(
        "issuing CA rolled over new_key_id=%s old_key_id=%s",
        new.key_id,
        issuer_key_id(old),
    )
    _emit(
        as_json,
        {
            "issuer": new.name,
            "key_id": new.key_id,
            "previous_key_id": issuer_key_id(old),
            "not_after": new.certificate.not_valid_after_utc.isoformat(),
            "trust": str(settings.layout.trust),
        },
        f"new issuing CA {new.name!r} key id {new.key_id}\n"
        f"  previous {issuer_key_id(old)} stays trusted until 'certfleet ca retire'\n"
        f"  copy {settings.layout.trust} to every broker's and registry's data folder",
    )


def ca_issuers(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """List the issuing CAs: current, earlier (still trusted), retired; with the count of
    live certificates of each when the registry's database is here."""
    settings = build_settings(data_dir=data_dir)
    layout = settings.layout
    live = _live_by_issuer(data_dir)
    rows: list[dict[str, Any]] = []
    current = read_certificate(layout.issuing_cert)
    states = [("current", current)]
    for folder, state in ((layout.issuers_dir, "trusted"), (layout.retired_dir, "retired")):
        if folder.is_dir():
            states.extend((state, read_certificate(p)) for p in sorted(folder.glob("*.crt")))
    for state, cert in states:
        key_id = issuer_key_id(cert)
        if state == "trusted" and key_id == issuer_key_id(current):
            continue
        rows.append(
            {
                "key_id": key_id,
                "state": state,
                "subject": cert.subject.rfc4514_string(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "live_certificates": None if live is None else live.get(key_id, 0),
            }
        )
    text = "\n".join(
        f"{row['state']:8} {row['key_id'][:16]}  {row['subject']}  live="
        f"{'?' if row['live_certificates'] is None else row['live_certificates']}"
        for row in rows
    )
    _emit(as_json, rows, text)


def ca_retire(
    issuer: Annotated[str, typer.Option(help="Key id (or its first 8+ hex digits).")],
    force: Annotated[
        bool, typer.Option(help="Retire although live certificates remain (they stop working).")
    ] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop trusting an earlier issuing CA once no live certificate of it remains."""
    settings = build_settings(data_dir=data_dir)
    cert_path = find_previous(settings.layout, issuer)
    key_id = issuer_key_id(read_certificate(cert_path))
    live = _live_by_issuer(data_dir)
    if not force:
        if live is None:
            raise CAError(
                "no registry database here to check that no certificate of this issuing CA "
                "is live: run it where the registry's database is (CERTFLEET_REGISTRY_"
                "DATABASE_URL), or pass --force"
            )
        if live.get(key_id, 0):
            raise CAError(
                f"{live[key_id]} live certificates were issued by {key_id[:16]}: renew those "
                "devices first ('certfleet registry devices renew-now --issuer "
                f"{key_id[:16]}'), or wait for their renewal (nothing was retired)"
            )
    moved = retire_issuer(settings.layout, key_id)
    log.info("issuing CA retired key_id=%s forced=%s", key_id, force)
    _emit(
        as_json,
        {"key_id": key_id, "retired": str(moved)},
        f"issuing CA {key_id[:16]} retired ({moved}); copy {settings.layout.trust} to the "
        "brokers and registries",
    )


def ca_revoke_issuing(
    issuer: Annotated[str, typer.Option(help="Key id (or its first 8+ hex digits).")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = (
        "issuing CA compromised"
    ),
    registry: Annotated[
        str | None,
        typer.Option("--registry", help="registry URL (CERTFLEET_REGISTRY_URL)"),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="admin bearer token (CERTFLEET_REGISTRY_TOKEN)")
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option("--operator", help="admin operator certificate clients/NAME.crt|.key"),
    ] = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke an earlier issuing CA with the root (compromise): the root signs a CRL listing
    it (ca/revoked-issuers.crl), it leaves trust.pem, and the registry (admin role) revokes
    its live certificates and tells every broker, which refuse them and drop their sessions
    within a second. Roll over first: the current issuing CA cannot be revoked."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from factory.issuers import (
        apply_revocation,
        client_and_server_certificates_of,
        prepare_revocation,
    )
    from registry.operator_cli import _call, operator_client

    settings = build_settings(data_dir=data_dir)
    layout = settings.layout
    # The root signs the revocation: ca/root.key, or the token's root key (ca init --pkcs11-*).
    root_key = CertificateAuthority.load(layout, passphrase=settings.passphrase).root_key(
        settings.passphrase
    )
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    cert_path, issuing, arl = prepare_revocation(layout, issuer, root_key)
    key_id = issuer_key_id(issuing)
    # The registry first: if it refuses or cannot be reached nothing changed here, and the
    # same command can run again.
    result = _call(
        client,
        "POST",
        "/issuers/revoke",
        json={
            "issuer_pem": issuing.public_bytes(Encoding.PEM).decode(),
            "arl_pem": arl.public_bytes(Encoding.PEM).decode(),
            "reason": reason,
        },
    )
    apply_revocation(layout, cert_path, arl)
    log.warning("issuing CA revoked by the root key_id=%s", key_id)
    stale = client_and_server_certificates_of(layout, key_id)
    text = (
        f"issuing CA {key_id[:16]} revoked: {result['revoked_certificates']} certificates "
        f"(feed seq {result['revocation_seq']}); root CRL {layout.revoked_issuers}\n"
        "  its devices get a new certificate only by re-enrollment (certfleet registry "
        "devices reenroll) or a claim (EST), docs/factory.md\n"
        "  its operator and service certificates are refused by the registry and the brokers"
    )
    if stale:
        text += "; re-issue these (certfleet ca issue-client / issue-server):\n" + "\n".join(
            f"    {path}" for path in stale
        )
    _emit(
        as_json,
        {**result, "arl": str(layout.revoked_issuers), "to_reissue": [str(p) for p in stale]},
        text,
    )


def register(ca_app: typer.Typer) -> None:
    """Add the commands to ``certfleet ca`` (once)."""
    if any(command.name == "rollover" for command in ca_app.registered_commands):
        return
    ca_app.command("rollover")(ca_rollover)
    ca_app.command("issuers")(ca_issuers)
    ca_app.command("retire")(ca_retire)
    ca_app.command("revoke-issuing")(ca_revoke_issuing)
