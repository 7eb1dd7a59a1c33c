"""`certfleet` run as a real process (the console entry point), and process checks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CERTFLEET = [sys.executable, "-m", "certfleet.cli"]


def certfleet_up(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`certfleet up --data-dir DATA_DIR ARGS...` started, stdout and stderr merged."""
    return subprocess.Popen(
        [*CERTFLEET, "up", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_certfleet(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess (one-line errors, exit codes)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*CERTFLEET, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
