"""`certfleet ca` and `certfleet factory` commands.

Errors of our own types propagate to ``certfleet.cli.main``, which prints them as one line
and exits 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from factory.ca import CertificateAuthority, TokenInit, write_issued
from factory.errors import CAError, ProvisionError
from factory.settings import FactorySettings, build_settings
from fleetcore.duration import parse_duration
from fleetcore.errors import ConfigError
from fleetcore.keys import KEY_ALGORITHMS
from fleetcore.layout import DataLayout
from fleetcore.profile import (
    DEFAULT_OPERATOR_ROLE,
    IdentityKind,
    OperatorRole,
    check_name,
    serial_hex,
)

if TYPE_CHECKING:
    from factory.provision import ProvisionSummary

__all__ = ["ca_app", "factory_app"]

log = logging.getLogger(__name__)

ca_app = typer.Typer(
    help="The private CA: init, server and client certificates.", no_args_is_help=True
)
factory_app = typer.Typer(help="Provisioning on the manufacturing line.", no_args_is_help=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Data folder (env CERTFLEET_DATA_DIR, default ./certfleet-data)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON result for scripts.")]


def _emit(as_json: bool, body: dict[str, Any], text: str) -> None:
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        typer.echo(text)


def _load_ca(settings: FactorySettings) -> CertificateAuthority:
    return CertificateAuthority.load(settings.layout, passphrase=settings.passphrase)


# -- certfleet ca -------------------------------------------------------------------------


@ca_app.command("init")
def ca_init(
    trust_domain: Annotated[
        str | None,
        typer.Option(help="DNS-like trust domain of every identity (default fleet.local)."),
    ] = None,
    data_dir: DataDirOption = None,
    key_algorithm: Annotated[
        str | None, typer.Option(help=f"One of {', '.join(KEY_ALGORITHMS)} (default p256).")
    ] = None,
    publish_url: Annotated[
        str | None,
        typer.Option(
            help="http:// base URL of the registry's publication listener: every certificate "
            "carries <URL>/crl.der and <URL>/ocsp (CERTFLEET_CA_PUBLISH_URL)."
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(help="Encrypt the CA keys with the first line of this 0600 file."),
    ] = None,
    pkcs11_module: Annotated[
        str | None,
        typer.Option(
            help="Generate the CA keys in a PKCS#11 token through this module, e.g. "
            "/usr/lib/softhsm/libsofthsm2.so (CERTFLEET_CA_PKCS11_MODULE)."
        ),
    ] = None,
    pkcs11_token: Annotated[
        str | None, typer.Option(help="Label of the PKCS#11 token to generate the keys in.")
    ] = None,
    pin_file: Annotated[
        Path | None,
        typer.Option(
            help="The token's user PIN: first line of this 0600 file (CERTFLEET_CA_PIN_FILE); "
            "recorded so later commands find it."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create the root and issuing CA. Keys are encrypted with --passphrase-file or
    CERTFLEET_CA_PASSPHRASE, or generated in a PKCS#11 token (--pkcs11-module,
    --pkcs11-token, --pin-file): every later command signs with the token, no further flags.

    Refuses to overwrite an existing CA.
    """
    settings = build_settings(
        data_dir=data_dir,
        trust_domain=trust_domain,
        key_algorithm=key_algorithm,
        ca_publish_url=publish_url,
        ca_passphrase_file=passphrase_file,
    )
    if settings.key_algorithm not in KEY_ALGORITHMS:
        raise ConfigError(
            f"--key-algorithm {settings.key_algorithm!r} is not one of {', '.join(KEY_ALGORITHMS)}"
        )
    layout = settings.layout
    token = _token_init(pkcs11_module, pkcs11_token, pin_file)
    if token is not None and settings.passphrase is not None:
        raise ConfigError("a CA passphrase is for file keys; token keys are guarded by the PIN")
    ca = CertificateAuthority.init(
        layout,
        settings.trust_domain,
        passphrase=settings.passphrase,
        key_algorithm=settings.key_algorithm,
        publish_url=settings.ca_publish_url,
        token=token,
    )
    log.info(
        "ca created trust_domain=%s data_dir=%s encrypted=%s publish_url=%s keys=%s",
        ca.trust_domain,
        layout.root,
        settings.passphrase is not None,
        ca.publish_url or "-",
        f"pkcs11 token={token.token_label}" if token is not None else "files",
    )
    _emit(
        as_json,
        {
            "trust_domain": ca.trust_domain,
            "root_cert": str(layout.root_cert),
            "issuing_cert": str(layout.issuing_cert),
            "chain": str(layout.chain),
            "encrypted": settings.passphrase is not None,
            "publish_url": ca.publish_url,
            "keys": ca.keys.record.as_json() if ca.keys and ca.keys.record else "files",
        },
        f"CA created for trust domain {ca.trust_domain} in {layout.ca_dir}\n"
        f"  root:  {layout.root_cert}\n  chain: {layout.chain}"
        + (f"\n  keys:  PKCS#11 token {token.token_label!r}" if token is not None else ""),
    )


def _token_init(
    module: str | None, token_label: str | None, pin_file: Path | None
) -> TokenInit | None:
    """The token ``ca init`` generates keys in, or None (file keys)."""
    from factory.signer import build_key_settings, token_pin

    key_settings = build_key_settings(ca_pkcs11_module=module, ca_pin_file=pin_file)
    if token_label is None:
        if module is not None or pin_file is not None:
            raise ConfigError("--pkcs11-module and --pin-file go with --pkcs11-token LABEL")
        return None
    if key_settings.ca_pkcs11_module is None:
        raise ConfigError("--pkcs11-token needs --pkcs11-module LIB (CERTFLEET_CA_PKCS11_MODULE)")
    return TokenInit(
        module=key_settings.ca_pkcs11_module,
        token_label=token_label,
        pin=token_pin(key_settings, None),
        pin_file=key_settings.ca_pin_file,
    )


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise CAError(
            f"{existing[0]} already exists; pass --force to replace it (nothing was written)"
        )


@ca_app.command("issue-server")
def ca_issue_server(
    name: Annotated[str, typer.Option(help="Server name, e.g. broker or registry.")],
    dns: Annotated[list[str] | None, typer.Option("--dns", help="DNS name (repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="IP address (repeatable).")] = None,
    lifetime: Annotated[str, typer.Option(help="Validity, e.g. 397d.")] = "397d",
    force: Annotated[bool, typer.Option(help="Replace an existing certificate.")] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Issue a TLS server certificate into tls/<name>.crt (leaf + issuing CA) and .key (0600)."""
    settings = build_settings(data_dir=data_dir)
    check_name(name, "server name")
    layout = settings.layout
    cert_path, key_path = layout.server_cert(name), layout.server_key(name)
    _refuse_existing([cert_path, key_path], force)
    ca = _load_ca(settings)
    issued = ca.issue_server(
        name,
        dns_names=list(dns or []),
        ip_addresses=list(ip or []),
        lifetime=parse_duration(lifetime, what="--lifetime"),
    )
    write_issued(issued, cert_path, key_path, intermediate=ca.issuing_cert)
    serial = serial_hex(issued.certificate.serial_number)
    log.info("server certificate issued name=%s serial=%s", name, serial)
    _emit(
        as_json,
        {"name": name, "cert": str(cert_path), "key": str(key_path), "serial": serial},
        f"server certificate {name}: {cert_path} (key {key_path}) serial {serial}",
    )


@ca_app.command("issue-client")
def ca_issue_client(
    operator: Annotated[
        str | None, typer.Option(help="Operator name: spiffe://<td>/operator/NAME.")
    ] = None,
    service: Annotated[
        str | None, typer.Option(help="Service name: spiffe://<td>/service/NAME.")
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="Operator role in the certificate: viewer (read), operator (decommission, "
            "re-enroll, renew now) or admin (tokens, roles, CA operations). Default operator."
        ),
    ] = None,
    lifetime: Annotated[str, typer.Option(help="Validity, e.g. 365d.")] = "365d",
    force: Annotated[bool, typer.Option(help="Replace an existing certificate.")] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Issue an operator or service client certificate into clients/<name>.crt|.key."""
    if (operator is None) == (service is None):
        raise ConfigError("give exactly one of --operator NAME or --service NAME")
    if role is not None and operator is None:
        raise ConfigError("--role is for --operator certificates; a service has no role")
    operator_role = (
        (OperatorRole.parse(role) if role is not None else DEFAULT_OPERATOR_ROLE)
        if operator is not None
        else None
    )
    kind = IdentityKind.OPERATOR if operator is not None else IdentityKind.SERVICE
    name = operator if operator is not None else service
    assert name is not None
    settings = build_settings(data_dir=data_dir)
    check_name(name, f"{kind.value} name")
    layout = settings.layout
    cert_path, key_path = layout.client_cert(name), layout.client_key(name)
    _refuse_existing([cert_path, key_path], force)
    ca = _load_ca(settings)
    identity = ca.identity(kind, name)
    issued = ca.issue_client(
        identity,
        not_after=_now() + parse_duration(lifetime, what="--lifetime"),
        role=operator_role,
    )
    write_issued(issued, cert_path, key_path)
    serial = serial_hex(issued.certificate.serial_number)
    log.info(
        "client certificate issued identity=%s role=%s serial=%s",
        identity.uri,
        operator_role or "-",
        serial,
    )
    _emit(
        as_json,
        {
            "identity": identity.uri,
            "role": operator_role.value if operator_role is not None else None,
            "cert": str(cert_path),
            "key": str(key_path),
            "serial": serial,
        },
        f"{identity.uri}{f' ({operator_role})' if operator_role else ''}: {cert_path} "
        f"(key {key_path}) serial {serial}",
    )


def _now() -> Any:
    from fleetcore.clock import utcnow

    return utcnow()


# -- certfleet factory --------------------------------------------------------------------


@factory_app.command("provision")
def factory_provision(
    count: Annotated[int | None, typer.Option(help="Mint N devices <prefix>-000001...")] = None,
    serials: Annotated[
        Path | None,
        typer.Option(help="CSV of hardware serials (column hardware_serial, optional device_id)."),
    ] = None,
    prefix: Annotated[str, typer.Option(help="Device id prefix.")] = "dev",
    lifetime: Annotated[
        str | None,
        typer.Option(help="Certificate lifetime, e.g. 365d (CERTFLEET_DEVICE_LIFETIME)."),
    ] = None,
    stagger: Annotated[
        str | None,
        typer.Option(
            help="Window the expiries are spread over, e.g. 90d (CERTFLEET_DEVICE_STAGGER)."
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(help="Register the batch at this registry URL (CERTFLEET_REGISTRY_URL)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token for the registry (prefer CERTFLEET_REGISTRY_TOKEN); without "
            "one, the client certificate clients/<--client>.crt is used."
        ),
    ] = None,
    client: Annotated[
        str | None, typer.Option(help="Client certificate name for the registry (factory).")
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="Broker address for device.json (CERTFLEET_BROKER_ADDR).")
    ] = None,
    key_algorithm: Annotated[str | None, typer.Option(help="Device key: p256 (default).")] = None,
    workers: Annotated[int | None, typer.Option(help="Minting processes (0 = per CPU).")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Devices per unit of work.")] = None,
    batch_id: Annotated[str | None, typer.Option(help="Batch id for the manifest.")] = None,
    fsync_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between manifest fsyncs (0 = after every chunk; default 1). "
            "CERTFLEET_FACTORY_FSYNC_INTERVAL."
        ),
    ] = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mint a batch: one bundle per device under devices/<id>/ and a manifest line for each.

    Running the same command again resumes a killed batch.
    """
    from factory.batch import read_serials_csv
    from factory.provision import provision_batch

    if (count is None) == (serials is None):
        raise ProvisionError("give exactly one of --count N or --serials FILE.csv")
    settings = build_settings(
        data_dir=data_dir,
        device_lifetime=lifetime,
        device_stagger=stagger,
        registry_url=registry,
        registry_token=token,
        factory_registry_client=client,
        broker_addr=broker,
        key_algorithm=key_algorithm,
        factory_workers=workers,
        factory_chunk_size=chunk_size,
        factory_fsync_interval=fsync_interval,
    )
    lifetime_td = parse_duration(settings.device_lifetime, what="--lifetime")
    stagger_td = parse_duration(settings.device_stagger, what="--stagger", allow_zero=True)
    if count is not None and count < 1:
        raise ProvisionError(f"--count must be at least 1 (got {count})")
    devices = read_serials_csv(serials, prefix) if serials is not None else count
    assert devices is not None
    ca = _load_ca(settings)
    registrar = _registrar(settings, ca) if settings.registry_url else None
    try:
        with _progress(enabled=not as_json and sys.stderr.isatty()) as on_progress:
            summary = provision_batch(
                ca,
                devices,
                prefix=prefix,
                lifetime=lifetime_td,
                stagger=stagger_td,
                broker=settings.broker_addr,
                key_algorithm=settings.key_algorithm,
                workers=settings.worker_count,
                chunk_size=settings.factory_chunk_size,
                batch_id=batch_id,
                registrar=registrar,
                on_progress=on_progress,
                keep_ids=False,
                fsync_interval_s=settings.factory_fsync_interval,
            )
    finally:
        if registrar is not None:
            registrar.close()
    _report_batch(as_json, summary, settings, registrar)


def _report_batch(
    as_json: bool, summary: ProvisionSummary, settings: FactorySettings, registrar: Any
) -> None:
    """Print a provisioned batch: counts, rate, where the bundles and manifest are, and what
    the registry took."""
    body = summary.as_dict()
    if registrar is not None:
        body["registry"] = {
            "url": settings.registry_url,
            "created": registrar.created,
            "existing": registrar.existing,
        }
    _emit(
        as_json,
        body,
        f"batch {summary.batch_id}: {summary.issued} issued, {summary.recovered} recovered from "
        f"bundles, {summary.skipped} already done ({summary.requested} requested) in "
        f"{summary.elapsed_s:.1f}s ({summary.rate:.0f} devices/s)\n"
        f"  bundles:  {settings.layout.devices_dir}\n  manifest: {settings.layout.manifest}"
        + (
            f"\n  registry: {registrar.created} created, {registrar.existing} already there"
            if registrar is not None
            else ""
        ),
    )


def _registrar(settings: FactorySettings, ca: CertificateAuthority) -> Any:
    from factory.registration import BatchRegistrar, RegistryClient

    assert settings.registry_url is not None
    layout: DataLayout = settings.layout
    token = settings.registry_token.get_secret_value() if settings.registry_token else None
    client = RegistryClient.connect(
        settings.registry_url,
        layout=layout,
        token=token or None,
        client_name=settings.factory_registry_client,
    )
    return BatchRegistrar(client)


class _progress:
    """A rich progress bar on stderr when it is a terminal; a no-op callback otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("provisioning"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("provision", total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(self._task, completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


@factory_app.command("sign-csr")
def factory_sign_csr(
    csr_path: Annotated[Path, typer.Argument(metavar="CSR.pem", help="The device's CSR.")],
    out: Annotated[
        Path | None, typer.Option(help="Write the certificate here (default: stdout).")
    ] = None,
    hardware_serial: Annotated[
        str | None, typer.Option(help="Hardware serial to record in the manifest.")
    ] = None,
    lifetime: Annotated[str | None, typer.Option(help="Certificate lifetime, e.g. 365d.")] = None,
    stagger: Annotated[str | None, typer.Option(help="Expiry stagger window, e.g. 90d.")] = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Sign a device-generated CSR with the device profile; the key stays on the device.

    Refuses a bad signature, a weak or unsupported key, a CA request and a foreign identity,
    and a device that already has a certificate in the manifest.
    """
    from factory.csr_signing import read_csr_file, sign_csr

    settings = build_settings(data_dir=data_dir, device_lifetime=lifetime, device_stagger=stagger)
    lifetime_td = parse_duration(settings.device_lifetime, what="--lifetime")
    stagger_td = parse_duration(settings.device_stagger, what="--stagger", allow_zero=True)
    csr_bytes = read_csr_file(csr_path)
    signed = sign_csr(
        _load_ca(settings),
        csr_bytes,
        lifetime=lifetime_td,
        stagger=stagger_td,
        hardware_serial=hardware_serial,
        out=out,
    )
    record = signed.record
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "device_id": record.device_id,
                    "identity": signed.identity.uri,
                    "serial": record.serial,
                    "not_after": record.not_after,
                    "out": str(out) if out is not None else None,
                    "certificate_pem": record.certificate_pem,
                },
                indent=2,
            )
        )
    elif out is None:
        typer.echo(record.certificate_pem, nl=False)
    else:
        typer.echo(f"{signed.identity.uri}: {out} serial {record.serial}")


@factory_app.command("expiry-report")
def factory_expiry_report(
    png: Annotated[
        Path | None,
        typer.Option(help="Where to write the chart (default <data-dir>/expiry-report.png)."),
    ] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="Skip the chart.")] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Certificates expiring per ISO week, from the manifest: a table and a PNG chart."""
    from factory.manifest import Manifest
    from factory.report import expiries_per_week, render_png

    settings = build_settings(data_dir=data_dir)
    layout = settings.layout
    if not layout.manifest.exists():
        raise ProvisionError(
            f"no manifest at {layout.manifest}: provision a batch first ('certfleet factory "
            "provision')"
        )
    weeks = expiries_per_week(Manifest(layout.manifest).records())
    png_path: Path | None = None
    if not no_png and weeks:
        png_path = render_png(weeks, png or layout.root / "expiry-report.png")
    total = sum(w.count for w in weeks)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "total": total,
                    "weeks": [w.as_dict() for w in weeks],
                    "png": str(png_path) if png_path else None,
                },
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    peak = max((w.count for w in weeks), default=0)
    table = Table(title=f"Certificate expiries per ISO week ({total} devices)")
    table.add_column("ISO week")
    table.add_column("week starting")
    table.add_column("expiring", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    for week in weeks:
        bar = "#" * (round(30 * week.count / peak) if peak else 0)
        share = f"{100 * week.count / total:.1f}%" if total else "-"
        table.add_row(week.iso_week, week.week_start.isoformat(), str(week.count), share, bar)
    console = Console()
    console.print(table)
    if png_path is not None:
        console.print(f"chart: {png_path}")


@factory_app.command("export")
def factory_export(
    device: Annotated[str, typer.Option("--device", help="Device id whose bundle to export.")],
    p12: Annotated[
        Path | None,
        typer.Option("--p12", help="Write key + certificate + CA chain as PKCS#12 (0600)."),
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="PKCS#12 password: first line of this 0600 file."),
    ] = None,
    der: Annotated[
        Path | None, typer.Option("--der", help="Write the certificate alone, DER.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a device bundle as PKCS#12 (openssl pkcs12, Windows, Java) and/or DER."""
    from factory.export import export_der, export_pkcs12, read_password_file, write_export

    if p12 is None and der is None:
        raise ConfigError("give --p12 FILE (with --password-file) and/or --der FILE")
    if p12 is not None and password_file is None:
        raise ConfigError("--p12 needs --password-file FILE (a PKCS#12 always has a password)")
    if p12 is None and password_file is not None:
        raise ConfigError("--password-file is for --p12; give --p12 FILE as well")
    layout = build_settings(data_dir=data_dir).layout
    written: dict[str, str] = {}
    if p12 is not None:
        assert password_file is not None
        data = export_pkcs12(layout, device, read_password_file(password_file))
        write_export(p12, data, secret=True, force=force)
        written["p12"] = str(p12)
    if der is not None:
        write_export(der, export_der(layout, device), secret=False, force=force)
        written["der"] = str(der)
    log.info("device exported device_id=%s formats=%s", device, ",".join(written))
    _emit(
        as_json,
        {"device_id": device, **written},
        "\n".join(f"{device}: {kind} {path}" for kind, path in written.items()),
    )


# -- certfleet factory claim ----------------------------------------------------------------

claim_app = typer.Typer(
    help="Claim (bootstrap) certificates: zero-touch enrollment of a batch.", no_args_is_help=True
)
factory_app.add_typer(claim_app, name="claim")


@claim_app.command("create")
def factory_claim_create(
    batch: Annotated[str, typer.Option(help="Production batch name (the claim's identity).")],
    quota: Annotated[int, typer.Option(help="How many devices may enroll with it, at most.")],
    expires: Annotated[str, typer.Option(help="How long it may be used, e.g. 30d.")],
    allow_file: Annotated[
        Path | None,
        typer.Option(
            help="Who may enroll: device ids, DEVICE_ID,HARDWARE_SERIAL or ,HARDWARE_SERIAL "
            "lines (or manifest JSON lines); default: any device id, up to the quota."
        ),
    ] = None,
    webhook: Annotated[
        str | None,
        typer.Option(
            help="The claim's own pre-enrollment webhook, asked before each enrollment with "
            "it (https://; http:// only to a loopback address); it must allow, fails closed."
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(help="Registry to record the claim in (CERTFLEET_REGISTRY_URL)."),
    ] = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mint a claim certificate for a batch into claims/<BATCH>/ (key 0600) and record the
    claim (quota, expiry, allow-list, webhook) in the registry. It enrolls devices over EST
    (simpleenroll) and nothing else: the broker refuses it."""
    from factory.claims import claim_dir, mint_claim, read_allow_file, register_claim, write_claim

    settings = build_settings(data_dir=data_dir, registry_url=registry)
    layout = settings.layout
    check_name(batch, "batch name")
    folder = claim_dir(layout, batch)
    _refuse_existing([folder / "claim.crt", folder / "claim.key"], force=False)
    allow = read_allow_file(allow_file) if allow_file is not None else []
    ca = _load_ca(settings)
    issued, record = mint_claim(
        ca,
        batch,
        quota=quota,
        lifetime=parse_duration(expires, what="--expires"),
        allow=allow,
        webhook_url=webhook,
    )
    registered = False
    if settings.registry_url is not None:
        registrar = _registrar(settings, ca)
        try:
            register_claim(registrar.client, record)
        finally:
            registrar.close()
        registered = True
    write_claim(layout, ca, issued, record)
    log.info(
        "claim created batch=%s serial=%s quota=%d expires_at=%s allow=%d registered=%s",
        batch,
        record.serial,
        record.quota,
        record.expires_at.isoformat(),
        len(allow),
        registered,
    )
    hint = (
        f"  recorded in the registry {settings.registry_url}"
        if registered
        else f"  NOT recorded: run 'certfleet registry claims import {folder / 'claim.json'}'"
    )
    _emit(
        as_json,
        {
            "batch": batch,
            "serial": record.serial,
            "quota": record.quota,
            "expires_at": record.expires_at.isoformat(),
            "allow": len(allow),
            "webhook": record.webhook_url is not None,
            "cert": str(folder / "claim.crt"),
            "key": str(folder / "claim.key"),
            "registered": registered,
        },
        f"claim {batch}: {folder / 'claim.crt'} (key {folder / 'claim.key'}) serial "
        f"{record.serial}, quota {record.quota}, expires {record.expires_at:%Y-%m-%dT%H:%M:%SZ}"
        f"\n{hint}",
    )
