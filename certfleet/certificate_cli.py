"""`certfleet certificate inspect FILE`: what our profile reads out of a certificate, and
whether the registry says it is revoked.

Revocation is asked, in this order: the OCSP responder the certificate names (AIA, or
``--ocsp-url``), answer checked against the issuing CA; else, for a device certificate with
operator credentials (``--token`` / ``--operator``), the registry's REST API; else it is
reported as not checked, with why. An unreachable registry is reported, not an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from rich.console import Console
from rich.table import Table

from factory.inspect import describe, load_certificate_file, ocsp_urls
from factory.ocsp_client import ask_ocsp
from fleetcore.errors import CertfleetError
from fleetcore.layout import DEFAULT_DATA_DIR, DataLayout
from fleetcore.profile import serial_hex

__all__ = ["certificate_app"]

certificate_app = typer.Typer(
    help="Read certificates the way certfleet does.", no_args_is_help=True
)


@certificate_app.callback()
def _group() -> None:
    """Read certificates the way certfleet does."""


def _issuer(data_dir: Path | None, issuer: Path | None) -> x509.Certificate | None:
    path = issuer or DataLayout(data_dir or DEFAULT_DATA_DIR).issuing_cert
    if issuer is None and not path.exists():
        return None
    return load_certificate_file(path)


def _via_registry(
    certificate: x509.Certificate,
    device_id: str,
    *,
    data_dir: Path | None,
    registry: str | None,
    token: str | None,
    operator: str | None,
) -> dict[str, Any]:
    from registry.operator_cli import operator_client

    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    try:
        response = client.send("GET", f"/devices/{device_id}")
    finally:
        client.close()
    if response.status_code == 404:
        return {"status": "unknown", "source": "registry", "detail": "device not registered"}
    if not response.is_success:
        return {
            "status": "not checked",
            "source": "registry",
            "detail": f"registry answered HTTP {response.status_code}",
        }
    serial = serial_hex(certificate.serial_number)
    for entry in response.json()["certificates"]:
        if entry["serial"] == serial:
            status = "revoked" if entry["status"] == "revoked" else "good"
            return {"status": status, "source": "registry", "revoked_at": entry["revoked_at"]}
    return {"status": "unknown", "source": "registry", "detail": "serial not registered"}


def _revocation(
    certificate: x509.Certificate,
    report: dict[str, Any],
    *,
    data_dir: Path | None,
    issuer_file: Path | None,
    ocsp_url: str | None,
    registry: str | None,
    token: str | None,
    operator: str | None,
) -> dict[str, Any]:
    urls = [ocsp_url] if ocsp_url else ocsp_urls(certificate)
    try:
        if urls:
            issuer = _issuer(data_dir, issuer_file)
            if issuer is None or issuer.subject != certificate.issuer:
                return {
                    "status": "not checked",
                    "source": "ocsp",
                    "detail": "its issuing CA certificate is not at hand (pass --issuer)",
                }
            answer = ask_ocsp(certificate, issuer, urls[0])
            return {
                "status": answer.status,
                "source": f"ocsp {urls[0]}",
                "revoked_at": answer.revoked_at.isoformat() if answer.revoked_at else None,
                "reason": answer.reason,
            }
        if report["kind"] == "device" and (token or operator):
            return _via_registry(
                certificate,
                report["name"],
                data_dir=data_dir,
                registry=registry,
                token=token,
                operator=operator,
            )
    except CertfleetError as exc:
        return {"status": "not checked", "source": "registry", "detail": str(exc)}
    return {
        "status": "not checked",
        "source": None,
        "detail": "no OCSP URL in the certificate; pass --ocsp-url, or --token / "
        "--operator for a device certificate",
    }


@certificate_app.command("inspect")
def inspect(
    file: Annotated[Path, typer.Argument(help="certificate file, PEM or DER")],
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="data folder with ca/issuing.crt")
    ] = None,
    issuer: Annotated[
        Path | None, typer.Option("--issuer", help="issuing CA certificate (for OCSP)")
    ] = None,
    ocsp_url: Annotated[
        str | None, typer.Option("--ocsp-url", help="ask this OCSP responder instead of the AIA")
    ] = None,
    registry: Annotated[
        str | None, typer.Option("--registry", help="registry URL (CERTFLEET_REGISTRY_URL)")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="CERTFLEET_REGISTRY_TOKEN", help="operator token"),
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option(
            "--operator", envvar="CERTFLEET_REGISTRY_OPERATOR", help="clients/NAME.crt|.key"
        ),
    ] = None,
    offline: Annotated[bool, typer.Option("--offline", help="do not ask about revocation")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Identity, kind, serial, validity, URLs, and revocation status of a certificate."""
    certificate = load_certificate_file(file)
    report = describe(certificate)
    report["revocation"] = (
        {"status": "not checked", "source": None, "detail": "--offline"}
        if offline
        else _revocation(
            certificate,
            report,
            data_dir=data_dir,
            issuer_file=issuer,
            ocsp_url=ocsp_url,
            registry=registry,
            token=token,
            operator=operator,
        )
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table("FIELD", "VALUE", show_header=False)
    for key, value in report.items():
        if key == "revocation":
            value = " ".join(
                str(part)
                for part in (
                    value["status"],
                    value.get("reason"),
                    value.get("revoked_at"),
                    value.get("source"),
                    value.get("detail"),
                )
                if part
            )
        elif isinstance(value, list):
            value = ", ".join(value) or "-"
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
