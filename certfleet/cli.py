"""The ``certfleet`` console script: one typer app composed of each part's command group."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleetcore.config import LOG_LEVELS
from fleetcore.errors import CertfleetError

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

__all__ = ["app", "main"]

log = logging.getLogger("certfleet")

_OUR_PACKAGES = frozenset({"fleetcore", "factory", "registry", "broker", "device_sim", "certfleet"})

app = typer.Typer(
    name="certfleet",
    help="Per-device X.509 identities and an MQTT broker that lets only live devices in.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_groups() -> None:
    from broker.cli import app as broker_app
    from certfleet.ca_issuers_cli import register as register_issuer_commands
    from certfleet.certificate_cli import certificate_app
    from certfleet.lifecycle_cli import lifecycle
    from certfleet.orchestrate import register as register_orchestration
    from device_sim.cli import app as sim_app
    from factory.cli import ca_app, factory_app
    from registry.cli import app as registry_app

    register_issuer_commands(ca_app)  # they read the registry's database: certfleet/
    app.add_typer(ca_app, name="ca")
    app.add_typer(factory_app, name="factory")
    app.add_typer(registry_app, name="registry")
    app.add_typer(broker_app, name="broker")
    sim_app.command("lifecycle")(lifecycle)  # needs every part, so it lives in certfleet/
    app.add_typer(sim_app, name="sim")
    app.add_typer(certificate_app, name="certificate")
    register_orchestration(app)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"certfleet {version('certfleet')}")
        raise typer.Exit()


def _settings_classes() -> list[type[BaseSettings]]:
    """Every part's settings object: what the config file and CERTFLEET_* may name."""
    from pydantic_settings import BaseSettings

    from broker.settings import BrokerSettings
    from certfleet.settings import OrchestrateSettings
    from device_sim.settings import SimSettings
    from factory.settings import FactorySettings
    from factory.signer import CaKeySettings
    from registry.operator_cli import OperatorSettings
    from registry.settings import RegistrySettings

    listed: list[type[BaseSettings]] = [
        FactorySettings,
        CaKeySettings,
        RegistrySettings,
        OperatorSettings,
        BrokerSettings,
        SimSettings,
        OrchestrateSettings,
    ]
    # And any other settings class of ours already imported (a part added later).
    pending, seen = list(BaseSettings.__subclasses__()), set(listed)
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls not in seen and cls.__module__.split(".")[0] in _OUR_PACKAGES:
            seen.add(cls)
            listed.append(cls)
    return listed


@app.callback()
def _root(
    log_level: str = typer.Option(
        "info", "--log-level", envvar="CERTFLEET_LOG_LEVEL", help=", ".join(LOG_LEVELS)
    ),
    log_format: str = typer.Option(
        "logfmt", "--log-format", envvar="CERTFLEET_LOG_FORMAT", help="logfmt or json"
    ),
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="CERTFLEET_CONFIG",
            help="TOML settings file, below flags and CERTFLEET_* variables (docs/operations.md)",
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file",
            envvar="CERTFLEET_CA_PASSPHRASE_FILE",
            help="file whose first line is the CA key passphrase (not CERTFLEET_CA_PASSPHRASE)",
        ),
    ] = None,
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    from certfleet.logs import configure_logging
    from fleetcore.config import CONFIG_ENV, config_file_values, unknown_settings

    configure_logging(log_level, log_format)
    # Flags become the variables every settings object (and every child process) reads.
    os.environ["CERTFLEET_LOG_LEVEL"] = log_level
    os.environ["CERTFLEET_LOG_FORMAT"] = log_format
    if passphrase_file is not None:
        os.environ["CERTFLEET_CA_PASSPHRASE_FILE"] = str(passphrase_file)
    if config is not None:
        os.environ[CONFIG_ENV] = str(config.resolve())
        config_file_values(config)  # refuse a missing or invalid file now, in one line
    for warning in unknown_settings(_settings_classes()):
        log.warning("setting ignored: %s", warning)


def main() -> None:
    """Entry point: run the CLI, turning our own errors into one line and exit code 2.

    typer runs in standalone mode, so usage errors (unknown option, bad value) are printed
    by typer itself with the usage line and exit code 2.
    """
    _register_groups()
    try:
        app()
    except CertfleetError as exc:
        print(f"certfleet: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if os.environ.get("CERTFLEET_TRACEBACK"):
            raise
        print(
            f"certfleet: internal error: {type(exc).__name__}: {exc} "
            "(set CERTFLEET_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
