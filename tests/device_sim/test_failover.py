"""Failover between brokers (issue 13): each device has the fleet's broker list, starts at its
own index, and after a drop reconnects (backoff + jitter) to the next broker in its list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from device_sim.bundle import discover_bundles
from device_sim.device import DeviceConfig
from device_sim.runner import SimRun
from device_sim.settings import broker_list, build_settings
from fleetcore.address import Address
from fleetcore.errors import ConfigError
from tests.device_sim.conftest import MosquittoFactory
from tests.support.pki import Fleet
from tests.support.waits import wait_for


def test_broker_list_is_validated_like_every_address() -> None:
    assert broker_list("127.0.0.1:8883, [::1]:8884") == [
        Address("127.0.0.1", 8883),
        Address("::1", 8884),
    ]
    with pytest.raises(ConfigError, match="is not host:port"):
        broker_list("127.0.0.1:8883,nohost")
    with pytest.raises(ConfigError, match="needs host:port entries"):
        broker_list("127.0.0.1:8883,")
    with pytest.raises(ConfigError, match="needs a real port"):
        broker_list("127.0.0.1:0")
    with pytest.raises(ConfigError, match="names a broker twice"):
        broker_list("127.0.0.1:1,127.0.0.1:1")


def test_broker_list_comes_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTFLEET_SIM_BROKERS", "127.0.0.1:1883,127.0.0.1:1884")
    assert build_settings().sim_brokers == "127.0.0.1:1883,127.0.0.1:1884"
    assert build_settings(sim_brokers="127.0.0.1:9").sim_brokers == "127.0.0.1:9"
    monkeypatch.setenv("CERTFLEET_SIM_BROKERS", "127.0.0.1:1883;x")
    with pytest.raises(ConfigError, match="CERTFLEET_SIM_BROKERS|sim_brokers"):
        build_settings()


@pytest.mark.mosquitto
def test_devices_of_a_killed_broker_move_to_the_other_and_keep_publishing(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    first, second = mosquitto(), mosquitto()
    bundles = discover_bundles(fleet.data_dir, 10)
    config = DeviceConfig(
        "127.0.0.1",
        first.port,
        failover=(Address("127.0.0.1", second.port),),
        rate=10.0,
        backoff_base=0.05,
        backoff_cap=0.5,
    )
    with SimRun(bundles, config, duration=6.0, workers=0, seed=5) as run:
        deadline = time.monotonic() + 20
        while run.snapshot().connected < 10 and time.monotonic() < deadline:
            run.wait(0.05)
        assert run.snapshot().connected == 10
        first.stop()  # SIGKILL: half of the fleet (every other device) loses its broker
        deadline = time.monotonic() + 10
        while run.snapshot().failovers < 5 and time.monotonic() < deadline:
            run.wait(0.05)
        moved = run.snapshot()
        assert moved.failovers == 5
        assert moved.connected == 10
        acked_after_move = moved.acked
        assert run.wait(30)
    summary = run.summary()
    assert summary["failovers"] == 5 == summary["reconnects"]
    assert summary["disconnects_by_reason"] == {"connection_lost": 5}
    assert summary["devices_stopped"] == 0
    # Everyone kept publishing on the surviving broker, and nothing was lost at QoS 1.
    assert summary["messages_acknowledged"] > acked_after_move + 10 * 10
    assert summary["messages_acknowledged"] == summary["messages_produced"]


@pytest.mark.mosquitto
def test_sim_run_takes_a_broker_list(fleet: Fleet, mosquitto: MosquittoFactory) -> None:
    first, second = mosquitto(), mosquitto()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "sim",
            "run",
            "--data-dir",
            str(fleet.data_dir),
            "--broker",
            f"127.0.0.1:{first.port},127.0.0.1:{second.port}",
            "--devices",
            "6",
            "--rate",
            "5",
            "--duration",
            "8",
            "--workers",
            "0",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "CERTFLEET_SIM_BACKOFF_BASE": "0.05",
            "CERTFLEET_SIM_BACKOFF_CAP": "0.5",
        },
    )
    try:
        # The run lasts 8 s; its devices are spread over both brokers.
        assert wait_for(lambda: second.connections() >= 3, 8), second.connections()
        second.stop()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["broker"] == f"127.0.0.1:{first.port},127.0.0.1:{second.port}"
    assert summary["devices_connected_ever"] == 6
    assert summary["failovers"] == 3
    assert summary["messages_acknowledged"] == summary["messages_produced"]
