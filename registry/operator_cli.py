"""`certfleet registry devices list|show|decommission|reenroll|audit`: the operator API
without curl.

These talk to a running registry over HTTPS (``--registry``, ``CERTFLEET_REGISTRY_URL``),
trusting ``ca/root.crt``, as an operator: a bearer token (``--token``,
``CERTFLEET_REGISTRY_TOKEN``) or an operator certificate ``clients/<NAME>.crt|.key``
(``--operator NAME``, ``CERTFLEET_REGISTRY_OPERATOR``). Output is a table, or ``--json``
(the API's own JSON, unchanged).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.table import Table

from factory.registration import RegistryClient
from fleetcore.config import settings_from_env
from fleetcore.errors import ConfigError, RegistryCallError
from fleetcore.layout import DEFAULT_DATA_DIR, DataLayout, write_public
from fleetcore.profile import check_name
from fleetcore.reasons import DEFAULT_REASON_CODE, REASON_CODES
from registry.cli_options import DataDir

__all__ = [
    "AsJson",
    "Operator",
    "OperatorSettings",
    "RegistryUrl",
    "Token",
    "call",
    "devices_app",
    "format_when",
    "operator_client",
    "print_table",
]

devices_app = typer.Typer(
    help="Devices through the registry's REST API, as an operator.", no_args_is_help=True
)


class OperatorSettings(BaseSettings):
    """Where the registry is and who the operator is."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    #: The registry's HTTPS base URL.
    registry_url: str = "https://127.0.0.1:8443"
    #: Bearer token; when unset, the operator certificate ``clients/<registry_operator>``.
    registry_token: SecretStr | None = None
    registry_operator: str | None = None


RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry", help="registry URL (CERTFLEET_REGISTRY_URL, default https://127.0.0.1:8443)"
    ),
]
Token = Annotated[
    str | None,
    typer.Option("--token", help="operator bearer token (CERTFLEET_REGISTRY_TOKEN)"),
]
Operator = Annotated[
    str | None,
    typer.Option(
        "--operator",
        help="operator certificate clients/NAME.crt|.key (CERTFLEET_REGISTRY_OPERATOR)",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="print the API's JSON")]
PageSize = Annotated[int, typer.Option("--limit", min=1, max=1000, help="page size")]
Cursor = Annotated[str | None, typer.Option("--cursor", help="next_cursor of the previous page")]
DeviceIdArg = Annotated[str, typer.Argument(help="device id, e.g. dev-000042")]


def operator_client(
    *,
    data_dir: Path | None,
    registry: str | None,
    token: str | None,
    operator: str | None,
) -> RegistryClient:
    """A registry client authenticated as an operator (token first, else certificate)."""
    settings = settings_from_env(
        OperatorSettings,
        "operator",
        {
            "data_dir": data_dir,
            "registry_url": registry,
            "registry_token": token,
            "registry_operator": operator,
        },
    )
    secret = settings.registry_token.get_secret_value() if settings.registry_token else None
    if not secret and not settings.registry_operator:
        raise ConfigError(
            "no operator credentials: pass --token (CERTFLEET_REGISTRY_TOKEN) or "
            "--operator NAME for clients/NAME.crt (certfleet ca issue-client --operator NAME)"
        )
    name = "-"
    if not secret and settings.registry_operator:
        name = check_name(settings.registry_operator, "operator name")
    return RegistryClient.connect(
        settings.registry_url,
        layout=DataLayout(settings.data_dir),
        token=secret,
        client_name=name,
        client_kind="operator",
        timeout_s=30.0,
    )


def _call(client: RegistryClient, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON body of a 2xx answer; any other answer is one RegistryCallError line."""
    try:
        response = client.send(method, path, **kwargs)
    finally:
        client.close()
    if response.is_success:
        return response.json()
    raise RegistryCallError(_refusal_text(response))


def _refusal_text(response: httpx.Response) -> str:
    try:
        detail: Any = response.json().get("detail")
    except ValueError:
        detail = response.text[:200]
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("error") or detail
    elif isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            for item in detail
            if isinstance(item, dict)
        )
    hint = ""
    if response.status_code == 401:
        hint = " (check --token / --operator)"
    elif response.status_code == 403 and " role" not in str(detail):
        hint = " (only operators may do this)"
    return f"registry refused (HTTP {response.status_code}): {detail}{hint}"


def _when(value: str | None) -> str:
    if not value:
        return "-"
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


#: Width when stdout is not a terminal (a pipe, a file): wide enough for a 40-digit serial
#: and timestamps in one line, so grep and awk see whole rows.
_PIPE_WIDTH = 200


def _print(table: Table) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=_PIPE_WIDTH)
    console.print(table)


@devices_app.command("list")
def list_devices(
    status: Annotated[str | None, typer.Option("--status", help="active or decommissioned")] = None,
    expiring_before: Annotated[
        str | None,
        typer.Option(
            "--expiring-before", help="only devices whose live certificate expires before (ISO)"
        ),
    ] = None,
    limit: PageSize = 100,
    cursor: Cursor = None,
    data_dir: DataDir = None,
    registry: RegistryUrl = None,
    token: Token = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """One page of devices by id (the next page's --cursor is printed after the table)."""
    params: dict[str, str | int] = {"limit": limit}
    for key, value in (
        ("status", status),
        ("expiring_before", expiring_before),
        ("cursor", cursor),
    ):
        if value is not None:
            params[key] = value
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    page = _call(client, "GET", "/devices", params=params)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    table = Table("DEVICE", "STATUS", "HARDWARE SERIAL", "CREATED", "LAST SEEN")
    for device in page["devices"]:
        table.add_row(
            device["device_id"],
            device["status"],
            device["hardware_serial"] or "-",
            _when(device["created_at"]),
            _when(device["last_seen_at"]),
        )
    _print(table)
    if page.get("next_cursor"):
        typer.echo(f"more: --cursor {page['next_cursor']}")


def _print_device(device: dict[str, Any]) -> None:
    summary = Table("FIELD", "VALUE", show_header=False)
    summary.add_row("device", device["device_id"])
    summary.add_row("status", device["status"])
    summary.add_row("hardware serial", device["hardware_serial"] or "-")
    summary.add_row("created", _when(device["created_at"]))
    summary.add_row("decommissioned", _when(device["decommissioned_at"]))
    summary.add_row("last seen", _when(device["last_seen_at"]))
    if device.get("last_telemetry"):
        summary.add_row("last telemetry", json.dumps(device["last_telemetry"], sort_keys=True))
    _print(summary)
    certificates = Table("SERIAL", "STATUS", "NOT BEFORE", "NOT AFTER", "REVOKED")
    for certificate in device["certificates"]:
        certificates.add_row(
            certificate["serial"],
            certificate["status"],
            _when(certificate["not_before"]),
            _when(certificate["not_after"]),
            _when(certificate["revoked_at"]),
        )
    _print(certificates)


@devices_app.command("show")
def show_device(
    device_id: DeviceIdArg,
    data_dir: DataDir = None,
    registry: RegistryUrl = None,
    token: Token = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """A device, its certificates and what it last reported."""
    check_name(device_id, "device id")
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    device = _call(client, "GET", f"/devices/{device_id}")
    if as_json:
        typer.echo(json.dumps(device, indent=2))
        return
    _print_device(device)


@devices_app.command("decommission")
def decommission_device(
    device_id: DeviceIdArg,
    reason: Annotated[
        str, typer.Option("--reason", help="why, for the audit log and the feed (required)")
    ],
    reason_code: Annotated[
        str | None,
        typer.Option(
            "--reason-code",
            help=f"RFC 5280 reason: {', '.join(REASON_CODES)} "
            f"(the registry's default: {DEFAULT_REASON_CODE})",
        ),
    ] = None,
    data_dir: DataDir = None,
    registry: RegistryUrl = None,
    token: Token = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """Revoke every live certificate of a device; the broker drops it within a second."""
    check_name(device_id, "device id")
    body: dict[str, str] = {"reason": reason}
    if reason_code is not None:
        body["reason_code"] = reason_code
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    result = _call(client, "POST", f"/devices/{device_id}/decommission", json=body)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    revoked = [c["serial"] for c in result["certificates"] if c["status"] == "revoked"]
    typer.echo(
        f"decommissioned {device_id}: revoked {', '.join(revoked) or 'no live certificate'} "
        f"(feed seq {result['revocation_seq']})"
    )


@devices_app.command("renew-now")
def renew_now(
    device_ids: Annotated[
        list[str] | None, typer.Argument(help="devices to renew at once (or --issuer)")
    ] = None,
    issuer: Annotated[
        str | None,
        typer.Option(
            help="every active device on this issuing CA (key id, 8+ hex digits; "
            "'certfleet ca issuers' lists them)"
        ),
    ] = None,
    data_dir: DataDir = None,
    registry: RegistryUrl = None,
    token: Token = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """Ask devices to renew now (operator role): after 'certfleet ca rollover' they move to
    the new issuing CA at once instead of at their next renewal."""
    ids = list(device_ids or [])
    if bool(ids) == (issuer is not None):
        raise ConfigError("give device ids or --issuer KEY_ID (exactly one)")
    for device_id in ids:
        check_name(device_id, "device id")
    body: dict[str, Any] = {"issuer": issuer} if issuer is not None else {"device_ids": ids}
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    result = _call(client, "POST", "/devices/renew-now", json=body)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"asked {result['requested']} devices to renew now")
    if result["not_active"]:
        typer.echo(f"not active (not asked): {', '.join(result['not_active'])}")


@devices_app.command("reenroll")
def reenroll_device(
    device_id: DeviceIdArg,
    csr: Annotated[
        Path, typer.Option("--csr", help="the CSR made on the device (PEM; its key stays there)")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="write the certificate here (default: stdout)"),
    ] = None,
    chain_out: Annotated[
        Path | None,
        typer.Option("--chain-out", help="write the CA chain (issuing + root) here"),
    ] = None,
    data_dir: DataDir = None,
    registry: RegistryUrl = None,
    token: Token = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """A new certificate for a device whose certificates have all expired (it cannot renew
    over MQTT). The same CSR again prints the same certificate."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from factory.csr import load_csr
    from factory.csr_signing import read_csr_file

    check_name(device_id, "device id")
    csr_pem = load_csr(read_csr_file(csr)).public_bytes(Encoding.PEM).decode()  # PEM or DER
    for target in (out, chain_out):
        if target is not None:
            _check_writable(target)
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    result = _call(client, "POST", f"/devices/{device_id}/reenroll", json={"csr_pem": csr_pem})
    try:
        if out is not None:
            write_public(out, result["certificate_pem"].encode())
        if chain_out is not None:
            write_public(chain_out, result["chain_pem"].encode())
    except OSError as exc:
        typer.echo(result["certificate_pem"], nl=False)
        raise ConfigError(
            f"the registry issued serial {result['serial']} but it cannot be written "
            f"({exc.filename}: {exc.strerror}); the certificate is printed on stdout, and the "
            "same command again prints it again"
        ) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif out is None:
        typer.echo(result["certificate_pem"], nl=False)
    else:
        again = " (issued before for this CSR)" if result["repeated"] else ""
        typer.echo(
            f"reenrolled {device_id}: {out} serial {result['serial']} valid until "
            f"{_when(result['not_after'])}{again}"
        )


def _check_writable(path: Path) -> None:
    """Refuse an output the certificate could not be written to, before asking for it."""
    folder = path.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(
            f"cannot write {path}: "
            + ("it is a folder" if path.is_dir() else f"{folder} is not a writable folder")
            + " (nothing was asked of the registry)"
        )


@devices_app.command("audit")
def device_audit(
    device_id: DeviceIdArg,
    limit: PageSize = 100,
    cursor: Cursor = None,
    data_dir: DataDir = None,
    registry: RegistryUrl = None,
    token: Token = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """The device's audit trail, newest first: who registered, renewed, decommissioned it."""
    check_name(device_id, "device id")
    params: dict[str, str | int] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    page = _call(client, "GET", f"/devices/{device_id}/audit", params=params)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    table = Table("AT", "ACTION", "WHO", "FROM", "DETAIL")
    for entry in page["entries"]:
        table.add_row(
            _when(entry["at"]),
            entry["action"],
            entry["who"],
            entry["from_addr"] or "-",
            json.dumps(entry["detail"], sort_keys=True) if entry["detail"] else "-",
        )
    _print(table)
    if page.get("next_cursor"):
        typer.echo(f"more: --cursor {page['next_cursor']}")


# Shared with the other operator commands (registry/expiry_cli.py).
call = _call
format_when = _when
print_table = _print
