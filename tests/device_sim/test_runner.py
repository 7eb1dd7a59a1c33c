"""SimRun and `certfleet sim run`: devices over workers, the JSON summary, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.server import BrokerServer
from device_sim.bundle import discover_bundles, write_enrolled_bundle
from device_sim.device import DeviceConfig, DeviceEvent
from device_sim.errors import BundleError, SimError
from device_sim.runner import SimRun, default_workers
from fleetcore.bundle_format import (
    BUNDLE_FILES,
    CERT_FILE,
    CHAIN_FILE,
    INFO_FILE,
    KEY_FILE,
    ROOT_FILE,
    bundle_info,
)
from fleetcore.profile import serial_hex
from tests.support.pki import Fleet
from tests.support.processes import certfleet_in_process

SUMMARY_FIELDS = {
    "devices",
    "workers",
    "elapsed_s",
    "devices_connected_ever",
    "messages_sent",
    "messages_acknowledged",
    "connect_latency",
    "publish_latency",
    "connect_failures_by_reason",
    "stopped_by_reason",
    "messages_acknowledged_per_s",
    "cpu_cores_used",
}


def test_run_in_process_summarizes_the_fleet_and_its_refusals(
    fleet: Fleet, certfleet_broker: BrokerServer
) -> None:
    bundles = discover_bundles(fleet.data_dir, 20)
    revoked = bundles[3].device_id
    certfleet_broker.revoke([serial_hex(fleet.serials[revoked])], revoked)
    events: list[DeviceEvent] = []
    config = DeviceConfig("127.0.0.1", certfleet_broker.port, rate=5.0)
    with SimRun(bundles, config, duration=2.0, workers=0, on_event=events.append, seed=1) as run:
        assert run.wait(30)
    summary = run.summary()
    assert summary.keys() >= SUMMARY_FIELDS
    assert summary["devices"] == 20
    assert summary["devices_connected_ever"] == 19
    assert summary["stopped_by_reason"] == {"connack_not_authorized": 1}
    assert summary["messages_acknowledged"] == summary["messages_produced"] > 19 * 5
    assert summary["messages_retransmitted"] == 0
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        assert summary["connect_latency"][key] is not None
        assert summary["publish_latency"][key] is not None
    assert summary["connect_latency"]["count"] == 19
    assert summary["errors"] == []
    assert {e.kind for e in events if e.device_id == revoked} == {"connect_failed", "stopped"}


def test_sim_run_command_prints_a_json_summary(
    fleet: Fleet, certfleet_broker: BrokerServer
) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "sim",
            "run",
            "--data-dir",
            str(fleet.data_dir),
            "--broker",
            f"127.0.0.1:{certfleet_broker.port}",
            "--devices",
            "12",
            "--rate",
            "4",
            "--duration",
            "2",
            "--workers",
            "2",
            "--qos",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary.keys() >= SUMMARY_FIELDS
    assert summary["workers"] == 2
    assert summary["devices"] == 12
    assert summary["devices_connected_ever"] == 12
    assert summary["messages_acknowledged"] == summary["messages_sent"] >= 12 * 4
    assert summary["qos"] == 1


def _sim(*args: str) -> subprocess.CompletedProcess[str]:
    """`certfleet sim run ARGS` in process: these refusals check only output and exit code."""
    return certfleet_in_process("sim", "run", *args)


def test_sim_run_refuses_devices_and_all_together(fleet: Fleet) -> None:
    completed = _sim("--data-dir", str(fleet.data_dir), "--devices", "2", "--all")
    assert completed.returncode == 2
    assert "either --devices N or --all" in completed.stderr


def test_sim_run_refuses_more_devices_than_bundles(fleet: Fleet) -> None:
    completed = _sim("--data-dir", str(fleet.data_dir), "--devices", "100000")
    assert completed.returncode == 2
    assert "asked for 100000 devices" in completed.stderr


def test_sim_run_refuses_a_malformed_broker_address(fleet: Fleet) -> None:
    completed = _sim("--data-dir", str(fleet.data_dir), "--devices", "1", "--broker", "nohost")
    assert completed.returncode == 2
    assert "is not host:port" in completed.stderr


def test_discover_refuses_a_folder_without_bundles(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no device bundles"):
        discover_bundles(tmp_path)


def test_incomplete_bundle_is_named(fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / "devices" / "dev-x").mkdir(parents=True)
    (tmp_path / "devices" / "dev-x" / "device.crt").write_text("")
    with pytest.raises(BundleError, match="lacks device.key, root.crt, device.json"):
        discover_bundles(tmp_path)


def test_run_needs_bundles() -> None:
    with pytest.raises(SimError, match="at least one device bundle"):
        SimRun([], DeviceConfig("127.0.0.1", 1), duration=1.0)


def test_default_workers_is_one_per_2500_devices() -> None:
    assert [default_workers(n) for n in (1, 2500, 2501, 10_000)] == [1, 1, 2, 4]


def test_a_worker_that_dies_is_reported_and_the_run_still_ends(
    fleet: Fleet, certfleet_broker: BrokerServer
) -> None:
    bundles = discover_bundles(fleet.data_dir, 4)
    config = DeviceConfig("127.0.0.1", certfleet_broker.port, rate=2.0)
    with SimRun(bundles, config, duration=60.0, workers=1) as run:
        deadline = time.monotonic() + 30
        while run.snapshot().connected < 4 and time.monotonic() < deadline:
            run.wait(0.1)
        os.kill(run.worker_pids[0], signal.SIGKILL)
        assert run.wait(10), "the run did not notice its dead worker"
    assert run.errors == ["worker 0 exited with code -9 without its final report"]
    summary = run.summary()
    assert summary["errors"] == run.errors


def test_discover_skips_hidden_folders_of_bundles_being_written(
    fleet: Fleet, tmp_path: Path
) -> None:
    devices = tmp_path / "devices"
    shutil.copytree(fleet.data_dir / "devices" / "dev-0000", devices / "dev-0000")
    half_written = devices / ".dev-0001.enroll-tmp"  # an EST enrollment interrupted
    half_written.mkdir()
    (half_written / "device.key").write_text("")
    bundles = discover_bundles(tmp_path)
    assert [bundle.device_id for bundle in bundles] == ["dev-0000"]
    with pytest.raises(BundleError, match="asked for 2 devices but .* holds 1 bundles"):
        discover_bundles(tmp_path, limit=2)


def test_an_enrolled_bundle_has_the_factorys_format(fleet: Fleet, tmp_path: Path) -> None:
    minted = fleet.data_dir / "devices" / "dev-0000"
    info = json.loads((minted / INFO_FILE).read_text())
    final = tmp_path / "devices" / "dev-0000"
    final.parent.mkdir()
    bundle = write_enrolled_bundle(
        final,
        certificate_pem=(minted / CERT_FILE).read_bytes(),
        key_pem=(minted / KEY_FILE).read_bytes(),
        chain_pem=(minted / CHAIN_FILE).read_bytes(),
        root_pem=(minted / ROOT_FILE).read_bytes(),
        info_json=bundle_info(**{name: info[name] for name in info}),
    )
    assert sorted(path.name for path in final.iterdir()) == sorted(BUNDLE_FILES)
    assert sorted(path.name for path in minted.iterdir()) == sorted(BUNDLE_FILES)
    assert json.loads((final / INFO_FILE).read_bytes()) == info
    assert (final / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert bundle.device_id == "dev-0000" and list(tmp_path.joinpath("devices").iterdir()) == [
        final
    ]
