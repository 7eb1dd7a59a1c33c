"""`certfleet up`: registry and broker started together, reachable, stopped on Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
from pathlib import Path

import httpx

from factory.ca import CertificateAuthority
from fleetcore.layout import DataLayout
from tests.support.ports import free_port
from tests.support.processes import alive, certfleet_up

# The old names, for older imports (tests.support has them now).
_up, _alive, _free_port = certfleet_up, alive, free_port


def test_up_starts_registry_and_broker_and_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    # The broker runs as node edge-1: its ready file is named by the node.
    layout = DataLayout(tmp_path)
    CertificateAuthority.init(layout, "fleet.test")
    registry_port, broker_port = free_port(), free_port()
    process = certfleet_up(
        tmp_path,
        "--registry-addr",
        f"127.0.0.1:{registry_port}",
        "--broker-addr",
        f"127.0.0.1:{broker_port}",
        env={"CERTFLEET_BROKER_NODE": "edge-1"},
    )
    try:
        lines: list[str] = []
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        transcript = "".join(lines)
        assert f"https://127.0.0.1:{registry_port}" in transcript, transcript
        assert f"mqtts://127.0.0.1:{broker_port}" in transcript, transcript
        assert f"console   https://127.0.0.1:{registry_port}/ui/" in transcript, transcript
        sign_in = httpx.get(
            f"https://127.0.0.1:{registry_port}/ui/sign-in",
            verify=ssl.create_default_context(cafile=str(layout.root_cert)),
        )
        assert sign_in.status_code == 200 and "Operator token" in sign_in.text
        # Missing server and service certificates were created.
        for name in ("registry", "broker"):
            assert layout.server_cert(name).exists()
        for name in ("broker", "registry", "factory"):
            assert layout.client_cert(name).exists()
        context = ssl.create_default_context(cafile=str(layout.root_cert))
        health = httpx.get(f"https://127.0.0.1:{registry_port}/api/v1/healthz", verify=context)
        assert health.status_code == 200
        with socket.create_connection(("127.0.0.1", broker_port), timeout=5):
            pass
        pids = [
            json.loads((tmp_path / f"{name}.ready.json").read_text())["pid"]
            for name in ("registry", "broker-edge-1")
        ]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert not any(alive(pid) for pid in pids)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_up_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    process = certfleet_up(tmp_path)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "certfleet ca init" in output


def test_up_refuses_an_ephemeral_broker_port(tmp_path: Path) -> None:
    CertificateAuthority.init(DataLayout(tmp_path), "fleet.test")
    process = certfleet_up(tmp_path, "--broker-addr", "127.0.0.1:0")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "needs a fixed broker port" in output
