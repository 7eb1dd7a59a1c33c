"""Single-node durability with real broker processes (`certfleet broker serve`): persistent
sessions, their queued QoS 1 messages and retained messages survive a SIGTERM restart; a
SIGKILL costs at most the documented flush bound; a corrupt state file is moved aside and
the broker starts; a device decommissioned while the broker was down gets neither its
session back nor in."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.persistence import decode_state, state_path
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.server import RegistryServer
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import ClientFiles, TestPKI, issue_device
from tests.support.servers import broker_data_dir, feed_broker_layout, register
from tests.support.waits import wait_for

MESSAGES = 100
INTERVAL_S = 0.5


class BrokerProcess:
    """`certfleet broker serve` in its own process, on an ephemeral port."""

    def __init__(self, layout: DataLayout, tmp_path: Path, **env: str) -> None:
        self.layout = layout
        self.ready = tmp_path / "broker-ready.json"
        self.log = tmp_path / "broker.log"
        self.env = {**os.environ, "CERTFLEET_BROKER_PERSIST_INTERVAL_S": str(INTERVAL_S), **env}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_url = ""

    @property
    def state_file(self) -> Path:
        return state_path(self.layout.broker_dir, "broker")

    def start(self, *extra: str) -> BrokerProcess:
        self.ready.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "certfleet.cli",
                    "broker",
                    "serve",
                    "--data-dir",
                    str(self.layout.root),
                    "--addr",
                    "127.0.0.1:0",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--ready-file",
                    str(self.ready),
                    *extra,
                ],
                stdout=log,
                stderr=log,
                env=self.env,
            )
        process = self.process
        assert wait_for(lambda: self.ready.exists() or process.poll() is not None, timeout=60)
        assert process.poll() is None, self.log.read_text()[-2000:]
        body = json.loads(self.ready.read_text())
        self.port = int(body["addr"].rsplit(":", 1)[1])
        self.metrics_url = body["metrics_url"]
        return self

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        process = self.process
        if process is None:
            return 0
        self.process = None
        if process.poll() is None:
            process.send_signal(signum)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise

    def metric(self, name: str) -> float:
        for line in httpx.get(self.metrics_url, timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


@pytest.fixture
def broker_process(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(broker_data_dir(pki, tmp_path / "data"), tmp_path)
    try:
        yield process
    finally:
        process.stop(signal.SIGKILL)


def _persistent(pki: TestPKI, port: int, name: str = "registry") -> MqttProbe:
    probe = connect(port, pki.client(IdentityKind.SERVICE, name), name, clean_session=False)
    assert probe.connected.is_set(), probe.reason
    return probe


def _subscribe_then_leave(pki: TestPKI, port: int, qos: int = 1) -> None:
    service = _persistent(pki, port)
    service.client.subscribe("devices/+/telemetry", qos=qos)
    assert service.subscribed.wait(5)
    service.close()


def _publish_acknowledged(
    port: int, device: ClientFiles, device_id: str, count: int, qos: int = 1
) -> None:
    probe = connect(port, device, device_id)
    try:
        assert probe.connected.is_set(), probe.reason
        for n in range(count):
            info = probe.client.publish(f"devices/{device_id}/telemetry", str(n).encode(), qos=qos)
            info.wait_for_publish(5)
            assert info.is_published(), f"message {n} not acknowledged"
    finally:
        probe.close()


def _receive_all(pki: TestPKI, port: int, count: int) -> list[int]:
    back = _persistent(pki, port)
    try:
        assert back.session_present, "the persistent session was not restored"
        wait_for(lambda: len(back.messages) >= count, timeout=15)
        return sorted(int(payload) for _, payload in back.messages)
    finally:
        back.close()


@pytest.mark.parametrize("qos", [1, 2])
def test_queued_messages_of_an_offline_persistent_session_survive_a_sigterm_restart(
    pki: TestPKI, broker_process: BrokerProcess, tmp_path: Path, qos: int
) -> None:
    """The measured bug of issue 13: 0 of 100 acknowledged QoS 1 messages arrived after a
    restart."""
    broker_process.start()
    _subscribe_then_leave(pki, broker_process.port, qos)
    device = issue_device(pki, tmp_path, "dev-q")
    _publish_acknowledged(broker_process.port, device, "dev-q", MESSAGES, qos)
    assert broker_process.stop(signal.SIGTERM) == 0
    mode = stat.S_IMODE(broker_process.state_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    broker_process.start()
    assert _receive_all(pki, broker_process.port, MESSAGES) == list(range(MESSAGES))
    # Delivered and acknowledged now: a second restart brings none of them back.
    assert broker_process.stop(signal.SIGTERM) == 0
    broker_process.start()
    again = _persistent(pki, broker_process.port)
    try:
        assert again.session_present
        assert not wait_for(lambda: len(again.messages) > 0, timeout=1.0)
    finally:
        again.close()


def test_a_retained_message_survives_a_restart(
    pki: TestPKI, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    broker_process.start()
    owner = connect(broker_process.port, issue_device(pki, tmp_path, "dev-k"), "dev-k")
    try:
        assert owner.connected.is_set()
        info = owner.client.publish("devices/dev-k/telemetry", b"kept", qos=1, retain=True)
        info.wait_for_publish(5)
    finally:
        owner.close()
    assert broker_process.stop(signal.SIGTERM) == 0
    broker_process.start()
    monitor = connect(broker_process.port, pki.client(IdentityKind.SERVICE, "monitor"), "monitor")
    try:
        monitor.client.subscribe("devices/+/telemetry", qos=1)
        assert monitor.subscribed.wait(5)
        assert wait_for(lambda: len(monitor.received) == 1)
        assert monitor.received == [("devices/dev-k/telemetry", b"kept", 1, True)]
    finally:
        monitor.close()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not JSON"),
        (json.dumps({"format": "certfleet-broker-state", "version": 99}).encode(), "version 99"),
        (
            json.dumps(
                {
                    "format": "certfleet-broker-state",
                    "version": 1,
                    "node": "broker",
                    "saved_at": 0,
                    "sessions": [{"key": "x", "subscriptions": [["a", 7]], "queued": []}],
                    "retained": [],
                }
            ).encode(),
            "sessions.0",
        ),
    ],
)
def test_a_corrupt_state_file_is_moved_aside_counted_and_the_broker_starts(
    pki: TestPKI, broker_process: BrokerProcess, content: bytes, why: str
) -> None:
    state_file = broker_process.state_file
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_bytes(content)
    broker_process.start()
    aside = list(state_file.parent.glob(f"{state_file.name}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert broker_process.metric("certfleet_broker_state_load_failures_total") == 1.0
    log = broker_process.log.read_text()
    assert "broker state unusable" in log and why in log and str(aside[0]) in log, log[-2000:]
    probe = _persistent(pki, broker_process.port)  # serving, with an empty state
    try:
        assert not probe.session_present
    finally:
        probe.close()


@pytest.mark.alone
def test_sigkill_loses_nothing_acknowledged_before_the_flush_bound(
    pki: TestPKI, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    """SIGKILL costs at most what was acknowledged in the last flush interval (plus one
    write): once that long has passed, every acknowledged message is on disk."""
    broker_process.start()
    _subscribe_then_leave(pki, broker_process.port)
    count = 50
    _publish_acknowledged(broker_process.port, issue_device(pki, tmp_path, "dev-s"), "dev-s", count)
    acknowledged_at = time.monotonic()

    def on_disk() -> int:
        try:
            return decode_state(broker_process.state_file.read_bytes()).queued_count
        except (OSError, ValueError):
            return 0

    assert wait_for(lambda: on_disk() == count, timeout=INTERVAL_S + 5)
    assert time.monotonic() - acknowledged_at <= INTERVAL_S + 1.0
    assert broker_process.stop(signal.SIGKILL) == -signal.SIGKILL
    broker_process.start()
    assert _receive_all(pki, broker_process.port, count) == list(range(count))


def test_a_device_decommissioned_while_the_broker_was_down_gets_no_session_back(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    tmp_path: Path,
) -> None:
    layout = feed_broker_layout(pki, tmp_path / "data")
    broker = BrokerProcess(layout, tmp_path)
    device = issue_device(pki, tmp_path, "dev-gone")
    register(operator, device, "dev-gone")
    try:
        broker.start("--registry-url", registry.url)
        away = connect(broker.port, device, "dev-gone", clean_session=False)
        assert away.connected.is_set(), away.reason
        away.client.subscribe("devices/dev-gone/cert/issued", qos=1)
        assert away.subscribed.wait(5)
        away.close()
        answers = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
        try:
            for n in range(3):
                topic = "devices/dev-gone/cert/issued"
                answers.client.publish(topic, str(n).encode(), qos=1).wait_for_publish(5)
        finally:
            answers.close()
        assert broker.stop(signal.SIGTERM) == 0
        saved = decode_state(broker.state_file.read_bytes())
        assert [(s.key, len(s.queued)) for s in saved.sessions] == [("dev-gone", 3)]

        response = operator.post("/devices/dev-gone/decommission", json={"reason": "stolen"})
        assert response.status_code == 200, response.text

        broker.start("--registry-url", registry.url)
        ready = broker.metrics_url.replace("/metrics", "/readyz")
        assert wait_for(lambda: httpx.get(ready, timeout=5).status_code == 200, timeout=30)
        refused = connect(broker.port, device, "dev-gone", clean_session=False)
        try:
            assert not refused.connected.is_set() and refused.reason == "Not authorized"
            assert not refused.messages
        finally:
            refused.close()

        def sessions_on_disk() -> list[str]:
            return [s.key for s in decode_state(broker.state_file.read_bytes()).sessions]

        assert wait_for(lambda: sessions_on_disk() == [], timeout=INTERVAL_S + 5)
        assert broker.stop(signal.SIGTERM) == 0
        assert sessions_on_disk() == []
    finally:
        broker.stop(signal.SIGKILL)
