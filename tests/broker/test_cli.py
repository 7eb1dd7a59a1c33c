"""`certfleet broker serve`: ready file per the contract, metrics, clean SIGTERM.

The server runs through the console entry point; the refusals (output and exit code only) run
in process (tests/support/processes.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.processes import certfleet_in_process
from tests.support.servers import broker_data_dir
from tests.support.waits import wait_for


def test_broker_serve_writes_ready_file_and_serves_metrics(pki: TestPKI, tmp_path: Path) -> None:
    layout = broker_data_dir(pki, tmp_path / "data")
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "broker",
            "serve",
            "--data-dir",
            str(layout.root),
            "--addr",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: ready.exists() or process.poll() is not None, timeout=60)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        body = json.loads(ready.read_text())
        assert body["pid"] == process.pid
        assert body["addr"].startswith("127.0.0.1:")
        assert body["metrics_url"].startswith("http://127.0.0.1:")
        port = int(body["addr"].rsplit(":", 1)[1])
        probe = connect(port, issue_device(pki, tmp_path, "dev-cli-1"), "dev-cli-1")
        try:
            assert probe.connected.is_set(), probe.reason
        finally:
            probe.close()
        metrics = httpx.get(body["metrics_url"], timeout=10).text
        assert "certfleet_broker_admitted_total 1.0" in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0


def test_broker_serve_without_server_certificate_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.json").write_text(json.dumps({"trust_domain": "fleet.test"}))
    result = certfleet_in_process(
        "broker", "serve", "--data-dir", str(tmp_path), "--addr", "127.0.0.1:0"
    )
    assert result.returncode == 2
    assert "server certificate" in result.stderr and "is missing" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("addr", "says"),
    [("127.0.0.1:99999", "port 99999 is outside 0..65535"), ("127.0.0.1:-1", "port '-1'")],
)
def test_bad_listen_address_is_one_line_and_exit_2(
    pki: TestPKI, tmp_path: Path, addr: str, says: str
) -> None:
    layout = broker_data_dir(pki, tmp_path / "data")
    result = certfleet_in_process("broker", "serve", "--data-dir", str(layout.root), "--addr", addr)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "CERTFLEET_BROKER_ADDR" in lines[0] and says in lines[0]
    assert "internal error" not in lines[0] and "Traceback" not in result.stderr


def test_unknown_log_level_lists_the_valid_ones(tmp_path: Path) -> None:
    result = certfleet_in_process(
        "--log-level", "trace", "broker", "serve", "--data-dir", str(tmp_path)
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "certfleet: error: log level 'trace' is not one of debug, info, warning, error, critical"
    ]


def test_missing_server_certificate_hint_names_the_real_command(
    pki: TestPKI, tmp_path: Path
) -> None:
    layout = broker_data_dir(pki, tmp_path / "data")
    layout.server_cert("broker").unlink()
    result = certfleet_in_process(
        "broker", "serve", "--data-dir", str(layout.root), "--addr", "127.0.0.1:0"
    )
    assert result.returncode == 2, result.stderr
    assert "certfleet ca issue-server --name broker" in result.stderr
