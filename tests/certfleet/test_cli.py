"""The console script's error contract: one clear line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_certfleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "certfleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_option_is_a_usage_error_with_exit_code_2() -> None:
    result = run_certfleet("ca", "init", "--bogus")
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_value_is_a_usage_error_with_exit_code_2() -> None:
    result = run_certfleet("registry", "token", "revoke", "not-a-number")
    assert result.returncode == 2
    assert "Invalid value for 'token_id'" in result.stderr


def test_refusal_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    assert run_certfleet("ca", "init", "--data-dir", data).returncode == 0
    result = run_certfleet("ca", "init", "--data-dir", data)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"certfleet: error: a CA already exists in {data}/ca; remove it first or choose "
        "another --data-dir (nothing was overwritten)"
    ]
