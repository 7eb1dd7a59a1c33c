"""Live revocation against a real registry: decommission drops the session at once."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import httpx
import pytest

from broker.auth import Refusal
from broker.revoked_set import RevokedSet
from broker.server import BrokerServer
from fleetcore.profile import IdentityKind, serial_hex
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.servers import broker_settings, feed_broker_layout, register
from tests.support.tls import tls_context
from tests.support.waits import wait_for


def test_decommission_drops_live_session_and_refuses_reconnect(
    pki: TestPKI, registry: RegistryServer, operator: httpx.Client, tmp_path: Path
) -> None:
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    files = issue_device(pki, tmp_path, "dev-live-1")
    register(operator, files, "dev-live-1")
    # The broker's long-poll lasts 30 s: a drop within 10 s can only come from the feed
    # answering the open poll at once (how fast that is, is bench/bench_revocation.py's job).
    settings = broker_settings(layout, registry_url=registry.url, broker_feed_wait_s=30)
    with BrokerServer(settings) as broker:
        device = connect(broker.port, files, "dev-live-1")
        try:
            assert device.connected.is_set(), device.reason
            response = operator.post("/devices/dev-live-1/decommission", json={"reason": "stolen"})
            assert response.status_code == 200, response.text
            assert device.disconnected.wait(10), "session of the revoked device was not dropped"
        finally:
            device.close()
        before = broker.metrics.refusal_count(Refusal.REVOKED.value)
        again = connect(broker.port, files, "dev-live-1")
        try:
            assert not again.connected.is_set()
            assert wait_for(
                lambda: broker.metrics.refusal_count(Refusal.REVOKED.value) == before + 1
            )
        finally:
            again.close()
        assert list(layout.broker_dir.glob("revoked-broker.*.journal"))


def test_restart_with_registry_down_still_refuses_revoked_serial(
    pki: TestPKI, tmp_path: Path
) -> None:
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    files = issue_device(pki, tmp_path, "dev-gone-1")
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        registry_feed_poll_seconds=0.2,
        telemetry_broker_addr=None,
    )
    with RegistryServer(settings) as registry:
        operator_files = pki.client(IdentityKind.OPERATOR, "alice")
        with httpx.Client(
            base_url=f"{registry.url}/api/v1", verify=tls_context(pki, operator_files), timeout=30
        ) as operator:
            register(operator, files, "dev-gone-1")
            response = operator.post("/devices/dev-gone-1/decommission", json={"reason": "eol"})
            assert response.status_code == 200, response.text
        registry_url = registry.url
        with BrokerServer(broker_settings(layout, registry_url=registry_url)) as broker:
            assert wait_for(
                lambda: (
                    broker.metrics.registry.get_sample_value("certfleet_broker_revoked_serials")
                    == 1
                )
            )
    # The registry is gone now; a new broker reads the revoked set from disk.
    with BrokerServer(broker_settings(layout, registry_url=registry_url)) as broker:
        before = broker.metrics.refusal_count(Refusal.REVOKED.value)
        probe = connect(broker.port, files, "dev-gone-1")
        try:
            assert not probe.connected.is_set()
            assert wait_for(
                lambda: broker.metrics.refusal_count(Refusal.REVOKED.value) == before + 1
            )
        finally:
            probe.close()


def test_broker_serves_devices_while_registry_is_unreachable(pki: TestPKI, tmp_path: Path) -> None:
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    with socket.socket() as placeholder:  # a loopback port with nobody listening
        placeholder.bind(("127.0.0.1", 0))
        dead_url = f"https://127.0.0.1:{placeholder.getsockname()[1]}"
    settings = broker_settings(layout, registry_url=dead_url, broker_feed_max_backoff_s=0.2)
    with BrokerServer(settings) as broker:
        app = broker.app
        assert app is not None and app.follower is not None
        follower = app.follower
        assert wait_for(lambda: follower.errors >= 2)  # retried, with backoff
        probe = connect(broker.port, issue_device(pki, tmp_path, "dev-offline-1"), "dev-offline-1")
        try:
            assert probe.connected.is_set(), probe.reason
        finally:
            probe.close()


def test_the_single_broker_revoked_file_is_migrated_to_the_node_file(
    pki: TestPKI, tmp_path: Path
) -> None:
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    files = issue_device(pki, tmp_path, "dev-legacy")
    layout.broker_dir.mkdir(parents=True, exist_ok=True)
    legacy = layout.broker_dir / "revoked.json"
    legacy.write_text(json.dumps({"last_seq": 4, "serials": [serial_hex(files.serial)]}))
    with BrokerServer(broker_settings(layout, broker_node="node-a")) as broker:
        probe = connect(broker.port, files, "dev-legacy")
        try:
            assert not probe.connected.is_set()
            assert broker.metrics.refusal_count(Refusal.REVOKED.value) == 1
        finally:
            probe.close()
    assert (layout.broker_dir / "revoked-node-a.snapshot").exists()
    migrated = RevokedSet(layout.broker_dir, "node-a")
    migrated.load()
    assert migrated.hex_serials() == {serial_hex(files.serial)} and migrated.last_seq == 4
    assert legacy.exists()  # the shared file of earlier versions may serve other nodes


@pytest.mark.alone
def test_a_restarted_broker_resumes_from_its_position_and_checks_without_replaying(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 23: no replay from 0 at every start and every resync_s; the position (and the
    feed's epoch) persisted with the journal is where the follower resumes, and the periodic
    check reads the one event at its checkpoint."""
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    devices = {f"dev-rs-{n}": issue_device(pki, tmp_path, f"dev-rs-{n}") for n in range(3)}
    for device_id, files in devices.items():
        register(operator, files, device_id)
    settings = broker_settings(
        layout,
        registry_url=registry.url,
        broker_feed_wait_s=1,
        broker_feed_resync_s=0.3,
    )
    for device_id in ("dev-rs-0", "dev-rs-1"):
        response = operator.post(f"/devices/{device_id}/decommission", json={"reason": "lost"})
        assert response.status_code == 200, response.text
    with BrokerServer(settings) as broker:
        follower = broker.app.follower if broker.app else None
        assert follower is not None
        assert wait_for(lambda: follower.after == 2 and follower.synced.is_set())
    response = operator.post("/devices/dev-rs-2/decommission", json={"reason": "lost"})
    assert response.status_code == 200, response.text  # seq 3, while the broker is down
    with (
        caplog.at_level(logging.INFO, logger="broker.revocation"),
        BrokerServer(settings) as broker,
    ):
        follower = broker.app.follower if broker.app else None
        assert follower is not None
        assert wait_for(lambda: follower.after == 3 and follower.synced.is_set())
        assert wait_for(lambda: follower.checks >= 3, 10)  # three checks, no replay
        assert follower.resyncs == 0 and follower.after == 3
        for device_id, files in devices.items():
            probe = connect(broker.port, files, device_id)
            try:
                assert not probe.connected.is_set(), device_id
            finally:
                probe.close()
    started = [r.getMessage() for r in caplog.records if "feed following" in r.getMessage()]
    assert started and "from=2 " in started[0], started
