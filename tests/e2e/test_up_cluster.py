"""`certfleet up --brokers 2`: two nodes on one port, a local nats-server with auth, all
stopped by PID on Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

from broker.cluster.natsd import find_nats_server
from factory.ca import CertificateAuthority
from fleetcore.layout import DataLayout
from tests.support.nats import start_nats
from tests.support.ports import free_port
from tests.support.processes import alive, certfleet_up


def test_up_with_two_brokers_runs_a_cluster_and_stops_everything(tmp_path: Path) -> None:
    if find_nats_server() is None:
        start_nats(tmp_path)  # skips, naming the package to install
    layout = DataLayout(tmp_path)
    CertificateAuthority.init(layout, "fleet.test")
    registry_port, broker_port = free_port(), free_port()
    process = certfleet_up(
        tmp_path,
        "--registry-addr", f"127.0.0.1:{registry_port}",
        "--broker-addr", f"127.0.0.1:{broker_port}",
        "--brokers", "2",
        env={"CERTFLEET_BROKER_METRICS_ADDR": "127.0.0.1:0"},
    )  # fmt: skip
    try:
        lines: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        transcript = "".join(lines)
        assert transcript.count(f"mqtts://127.0.0.1:{broker_port}") == 2, transcript
        assert "cluster   nats://127.0.0.1:" in transcript, transcript
        broker_pids = [
            json.loads((tmp_path / f"broker-broker-{i}.ready.json").read_text())["pid"]
            for i in (1, 2)
        ]
        ports_files = list((tmp_path / "nats").glob("nats-server_*.ports"))
        assert len(ports_files) == 1
        nats_pid = int(ports_files[0].stem.rsplit("_", 1)[1])
        credentials = tmp_path / "nats" / "nats-credentials.json"
        assert credentials.stat().st_mode & 0o077 == 0
        password = json.loads(credentials.read_text())["password"]
        assert password not in transcript
        for log in (tmp_path / "logs").glob("*.log"):
            assert password not in log.read_text(errors="replace")
        with socket.create_connection(("127.0.0.1", broker_port), timeout=5):
            pass
        process.send_signal(signal.SIGINT)
        rest = process.stdout.read()
        assert process.wait(timeout=60) == 0, rest
        assert not any(alive(pid) for pid in [*broker_pids, nats_pid])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
