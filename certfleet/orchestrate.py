"""`certfleet demo` and `certfleet up`: start the parts together."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the orchestration commands to the root app."""
