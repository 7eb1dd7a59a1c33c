"""The console script's error contract: one clear line and exit 2, never a traceback.

The usage errors run through the real entry points (``python -m certfleet.cli`` and the
installed ``certfleet`` script); the refusals, which only check output and exit code, run
in process (tests/support/processes.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import certfleet_in_process

CONSOLE_SCRIPT = str(Path(sys.executable).parent / "certfleet")


def run_certfleet(
    *args: str, env: dict[str, str] | None = None, command: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(command or (sys.executable, "-m", "certfleet.cli")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_unknown_option_is_a_usage_error_with_exit_code_2() -> None:
    result = run_certfleet("ca", "init", "--bogus")
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_value_is_a_usage_error_with_exit_code_2() -> None:
    result = run_certfleet("registry", "token", "revoke", "not-a-number", command=(CONSOLE_SCRIPT,))
    assert result.returncode == 2
    assert "Invalid value for 'token_id'" in result.stderr


def test_refusal_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    assert certfleet_in_process("ca", "init", "--data-dir", data).returncode == 0
    result = certfleet_in_process("ca", "init", "--data-dir", data)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"certfleet: error: a CA already exists in {data}/ca; remove it first or choose "
        "another --data-dir (nothing was overwritten)"
    ]


@pytest.mark.parametrize(
    ("variable", "value", "command", "part"),
    [
        ("CERTFLEET_FACTORY_WORKERS", "-1", ["factory", "provision", "--count", "1"], "factory"),
        ("CERTFLEET_BROKER_FEED_WAIT_S", "999", ["broker", "serve"], "broker"),
        ("CERTFLEET_BROKER_SESSION_EXPIRY_S", "4", ["broker", "serve"], "broker"),
        ("CERTFLEET_BROKER_SESSION_EXPIRY_S", str(30 * 86400 + 1), ["broker", "serve"], "broker"),
        ("CERTFLEET_REGISTRY_FEED_MAX_WAIT", "999", ["registry", "serve"], "registry"),
        ("CERTFLEET_SIM_WINDOW", "0", ["sim", "run"], "simulator"),
        ("CERTFLEET_DEMO_WORKERS", "999", ["demo"], "demo"),
    ],
)
def test_a_bad_setting_in_the_environment_is_one_line_naming_the_variable(
    tmp_path: Path, variable: str, value: str, command: list[str], part: str
) -> None:
    env = {"CERTFLEET_DATA_DIR": str(tmp_path / "data"), variable: value}
    result = certfleet_in_process(*command, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"certfleet: error: invalid {part} settings: {variable} (or its flag): Input should be"
    )
    assert not (tmp_path / "data").exists()  # refused before anything was written
