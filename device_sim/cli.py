"""`certfleet sim` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="device_sim commands", no_args_is_help=True)
