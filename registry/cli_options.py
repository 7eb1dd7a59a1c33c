"""Command-line option types shared by the registry's command groups (serve and tokens, and
the operator's device commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["DataDir"]

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="data folder (CERTFLEET_DATA_DIR, default ./certfleet-data)"),
]
