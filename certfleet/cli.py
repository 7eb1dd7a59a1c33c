"""The ``certfleet`` console script: one typer app composed of each part's command group."""

from __future__ import annotations

import os
import sys

import typer

from factory.errors import CertfleetError

__all__ = ["app", "main"]

app = typer.Typer(
    name="certfleet",
    help="Per-device X.509 identities and an MQTT broker that lets only live devices in.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_groups() -> None:
    from broker.cli import app as broker_app
    from certfleet.certificate_cli import certificate_app
    from certfleet.orchestrate import register as register_orchestration
    from device_sim.cli import app as sim_app
    from factory.cli import ca_app, factory_app
    from registry.cli import app as registry_app

    app.add_typer(ca_app, name="ca")
    app.add_typer(factory_app, name="factory")
    app.add_typer(registry_app, name="registry")
    app.add_typer(broker_app, name="broker")
    app.add_typer(sim_app, name="sim")
    app.add_typer(certificate_app, name="certificate")
    register_orchestration(app)


@app.callback()
def _root(
    log_level: str = typer.Option(
        "info", "--log-level", envvar="CERTFLEET_LOG_LEVEL", help="debug, info, warning, error"
    ),
) -> None:
    from certfleet.logs import configure_logging

    configure_logging(log_level)


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
