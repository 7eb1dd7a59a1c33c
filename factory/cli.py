"""`certfleet ca` and `certfleet factory` commands."""

from __future__ import annotations

import typer

ca_app = typer.Typer(
    help="The private CA: init, server and client certificates.", no_args_is_help=True
)
factory_app = typer.Typer(help="Provisioning on the manufacturing line.", no_args_is_help=True)
