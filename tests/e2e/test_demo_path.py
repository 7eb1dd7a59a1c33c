"""The demo's path with a few hundred devices, every step asserted: real subprocesses
(registry, broker, factory provisioning), the simulator in worker processes, a decommission
over REST and its proof."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import typer
from click.testing import Result
from rich.console import Console
from typer.testing import CliRunner

from certfleet.demo import (
    DEMO_MARKER,
    ZERO_TOUCH,
    Check,
    DemoResult,
    prepare_demo_folder,
    run_demo,
)
from certfleet.orchestrate import register
from certfleet.procs import OrchestrationError
from certfleet.settings import OrchestrateSettings

EXPECTED_CHECKS = [
    "devices registered",
    "devices enrolled by claim over EST",
    "serial outside the allow-list refused",
    "every device connected",
    "decommission accepted",
    "live session dropped within 1 s",
    "reconnect refused",
    "others still publishing",
    "registry shows the device decommissioned",
    "registry shows last seen",
    "registry stats seen in the last minute",
    "devices enrolled by claim publishing",
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.alone
def test_demo_path_with_a_few_hundred_devices(tmp_path: Path) -> None:
    settings = OrchestrateSettings(
        data_dir=tmp_path,
        demo_dir=tmp_path / "demo",
        demo_devices=300,
        demo_warmup_s=2.0,
        demo_observe_s=2.0,
        demo_workers=1,
    )
    output = io.StringIO()
    result = run_demo(settings, Console(file=output, width=200))
    transcript = output.getvalue()
    assert [check.name for check in result.checks] == EXPECTED_CHECKS, transcript
    failed = [check for check in result.checks if not check.ok]
    assert failed == [], transcript
    assert result.facts["drop_after_return_s"] <= 1.0
    assert result.facts["provision"]["registry"]["created"] == 300
    simulator = result.facts["simulator"]
    assert result.facts["est_enrollment"]["enrolled"] == ZERO_TOUCH
    assert result.facts["est_enrollment"]["refused_by_reason"] == {"forbidden": 1}
    assert simulator["devices_connected_ever"] == 300 + ZERO_TOUCH
    assert simulator["stopped_by_reason"] in (
        {"connack_not_authorized": 1},
        {"certificate_revoked": 1},
    )
    assert result.facts["messages_after_decommission"] > 0
    # The demo stopped what it started.
    assert not _alive(result.facts["registry_pid"])
    assert not _alive(result.facts["broker_pid"])
    assert (tmp_path / "demo" / "logs" / "registry.log").exists()


def test_demo_folder_of_a_previous_demo_is_wiped(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    prepare_demo_folder(folder)
    (folder / "stale.txt").write_text("from the last run")
    layout = prepare_demo_folder(folder)
    assert layout.root == folder
    assert not (folder / "stale.txt").exists()
    assert (folder / DEMO_MARKER).exists()


def test_demo_refuses_to_wipe_a_folder_it_did_not_make(tmp_path: Path) -> None:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "registry.db").write_text("real data")
    with pytest.raises(OrchestrationError, match="was not made by 'certfleet demo'"):
        prepare_demo_folder(folder)
    assert (folder / "registry.db").read_text() == "real data"


def _invoke_demo(monkeypatch: pytest.MonkeyPatch, result: DemoResult, *args: str) -> Result:
    import certfleet.demo

    monkeypatch.setattr(certfleet.demo, "run_demo", lambda settings, console: result)
    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # keep demo a subcommand
    return CliRunner().invoke(app, ["demo", *args])


def test_demo_command_exits_non_zero_when_a_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = DemoResult(
        checks=[
            Check("devices registered", True, "10 active"),
            Check("live session dropped within 1 s", False, "still connected after 10 s"),
        ]
    )
    outcome = _invoke_demo(monkeypatch, failed, "--json")
    assert outcome.exit_code == 1
    body = json.loads(outcome.stdout[outcome.stdout.index("{") :])
    assert body["ok"] is False
    assert [c["ok"] for c in body["checks"]] == [True, False]


def test_demo_command_exits_zero_when_every_check_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passed = DemoResult(checks=[Check("devices registered", True, "10 active")])
    outcome = _invoke_demo(monkeypatch, passed)
    assert outcome.exit_code == 0
    assert "every check passed" in outcome.stdout
