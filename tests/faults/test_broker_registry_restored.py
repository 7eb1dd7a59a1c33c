"""The registry's database is restored from a backup, or replaced by a new one, behind the
broker's back: the broker notices (feed head below its position, or a new feed epoch),
re-reads the feed from 0 keeping every serial it had, and applies new decommissions.

The promise (issue 22.3): a decommission made after the restore cuts the device within the
one-second revocation bound, not when the broker's pending long-poll ends. The brokers here
long-poll with the default wait (25 s), so a registry that let a follower ahead of its head
(or on another epoch) wait would fail the 2 s bounds below."""

from __future__ import annotations

import sqlite3
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from broker.auth import Refusal
from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from registry.feedmark import MARK_FILE
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import ClientFiles, TestPKI, issue_device
from tests.support.servers import broker_settings, feed_broker_layout, register
from tests.support.tls import tls_context
from tests.support.waits import wait_for

pytestmark = pytest.mark.alone  # the restore tests assert the 2 s revocation bound

#: The bound asserted: the one-second revocation promise, plus a second for a loaded machine.
PROMISE_S = 2.0


@contextmanager
def _registry(
    pki: TestPKI, db: Path, addr: str = "127.0.0.1:0"
) -> Iterator[tuple[RegistryServer, httpx.Client]]:
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr=addr,
        registry_database_url=f"sqlite:///{db}",
        registry_feed_poll_seconds=0.2,
        telemetry_broker_addr=None,
    )
    context: ssl.SSLContext = tls_context(pki, pki.client(IdentityKind.OPERATOR, "alice"))
    with (
        RegistryServer(settings) as server,
        httpx.Client(base_url=f"{server.url}/api/v1", verify=context, timeout=30) as operator,
    ):
        yield server, operator


def _decommission(operator: httpx.Client, device_id: str) -> None:
    response = operator.post(f"/devices/{device_id}/decommission", json={"reason": "lost"})
    assert response.status_code == 200, response.text


def _refused(broker: BrokerServer, files: ClientFiles, device_id: str) -> bool:
    probe = connect(broker.port, files, device_id)
    try:
        return not probe.connected.is_set()
    finally:
        probe.close()


def _run_scenario(pki: TestPKI, tmp_path: Path, *, restore: bool) -> None:
    """Three devices decommissioned in the first database; then the registry comes back on
    the same address with a backup taken after the first one (``restore``) or an empty
    database, and one more device is decommissioned there."""
    old = {f"dev-old-{n}": issue_device(pki, tmp_path, f"dev-old-{n}") for n in range(3)}
    new_files = issue_device(pki, tmp_path, "dev-new")
    first_db, second_db = tmp_path / "first.db", tmp_path / "second.db"
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    with _registry(pki, first_db) as (registry, operator):
        addr = urlsplit(registry.url).netloc
        for device_id, files in old.items():
            register(operator, files, device_id)
        register(operator, new_files, "dev-new")
        _decommission(operator, "dev-old-0")
        if restore:
            with sqlite3.connect(first_db) as source, sqlite3.connect(second_db) as copy:
                source.backup(copy)  # the backup: one revocation in it, dev-new registered
        for device_id in ("dev-old-1", "dev-old-2"):
            _decommission(operator, device_id)
        settings = broker_settings(layout, registry_url=registry.url, broker_feed_max_backoff_s=0.2)
        broker = BrokerServer(settings).start()
        app = broker.app
        assert app is not None and app.follower is not None
        follower = app.follower
        # The broker must have caught up with the first registry before that one goes away.
        if not wait_for(lambda: follower.after == 3 and follower.synced.is_set()):
            broker.stop()
            raise AssertionError("the broker never caught up with the first registry")
    try:
        live: MqttProbe = connect(broker.port, new_files, "dev-new")
        assert live.connected.is_set(), live.reason
        with _registry(pki, second_db, addr) as (second, operator):
            if not restore:
                register(operator, new_files, "dev-new")
            # The broker is back in a long-poll on the restored registry (25 s wait).
            assert wait_for(lambda: second.state.feed.waiting >= 1), "no long-poll arrived"
            started = time.monotonic()
            _decommission(operator, "dev-new")  # seq 2 (restored) or 1 (empty): both <= 3
            assert live.disconnected.wait(PROMISE_S), (
                f"the decommission after the restore was not applied within {PROMISE_S}s"
            )
            took = time.monotonic() - started
            assert follower.resyncs >= 1
        assert took <= PROMISE_S
        before = broker.metrics.refusal_count(Refusal.REVOKED.value)
        assert _refused(broker, new_files, "dev-new")
        for device_id, files in old.items():  # the revoked set never shrinks
            assert _refused(broker, files, device_id), device_id
        assert broker.metrics.refusal_count(Refusal.REVOKED.value) == before + 4
        live.close()
    finally:
        broker.stop()


def test_registry_restored_from_an_older_backup_is_followed(pki: TestPKI, tmp_path: Path) -> None:
    _run_scenario(pki, tmp_path, restore=True)


def test_registry_with_a_new_database_is_followed(pki: TestPKI, tmp_path: Path) -> None:
    _run_scenario(pki, tmp_path, restore=False)


def test_new_database_at_the_broker_position_is_noticed_by_its_epoch(
    pki: TestPKI, tmp_path: Path
) -> None:
    """The new database's head reaches the broker's position (1) without passing it: only
    the epoch the broker sends tells the registry (and the broker) that seq 1 is not the
    event the broker already has; its decommission cuts the device within the bound."""
    gone = issue_device(pki, tmp_path, "dev-ep-0")
    fresh = {f"dev-ep-{n}": issue_device(pki, tmp_path, f"dev-ep-{n}") for n in (1, 2)}
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    with _registry(pki, tmp_path / "first.db") as (registry, operator):
        addr = urlsplit(registry.url).netloc
        register(operator, gone, "dev-ep-0")
        _decommission(operator, "dev-ep-0")
        settings = broker_settings(layout, registry_url=registry.url, broker_feed_max_backoff_s=0.2)
        broker = BrokerServer(settings).start()
        app = broker.app
        assert app is not None and app.follower is not None
        follower = app.follower
        # The broker must have caught up with the first registry before that one goes away
        # (checked after it had gone, this raced the broker's first read against the shutdown).
        if not wait_for(lambda: follower.after == 1 and follower.synced.is_set()):
            broker.stop()
            raise AssertionError("the broker never caught up with the first registry")
    try:
        live = {
            device_id: connect(broker.port, files, device_id) for device_id, files in fresh.items()
        }
        assert all(probe.connected.is_set() for probe in live.values())
        with _registry(pki, tmp_path / "second.db", addr) as (second, operator):
            for device_id, files in fresh.items():
                register(operator, files, device_id)
            assert wait_for(lambda: second.state.feed.waiting >= 1), "no long-poll arrived"
            started = time.monotonic()
            _decommission(operator, "dev-ep-1")  # seq 1 of the new database: the position
            assert live["dev-ep-1"].disconnected.wait(PROMISE_S), (
                f"dev-ep-1 (seq 1 of a new database) was not cut within {PROMISE_S}s"
            )
            assert time.monotonic() - started <= PROMISE_S
            _decommission(operator, "dev-ep-2")
            assert live["dev-ep-2"].disconnected.wait(PROMISE_S)
            assert follower.resyncs >= 1 and wait_for(lambda: follower.after == 2)
        for device_id, files in {"dev-ep-0": gone, **fresh}.items():
            assert _refused(broker, files, device_id), device_id
        for probe in live.values():
            probe.close()
    finally:
        broker.stop()


def test_restored_database_past_the_broker_position_is_caught_by_the_checkpoint(
    pki: TestPKI, tmp_path: Path
) -> None:
    """A backup restored without the registry's feed mark (same epoch) that has moved past
    the broker's position: neither the epoch nor the head shows it, but the event at the
    broker's checkpoint is another one; the periodic check (one small read) finds it and the
    resync applies the decommission the broker had not seen."""
    devices = {f"dev-cp-{n}": issue_device(pki, tmp_path, f"dev-cp-{n}") for n in range(3)}
    first_db, backup_db = tmp_path / "first.db", tmp_path / "backup.db"
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    with _registry(pki, first_db) as (registry, operator):
        addr = urlsplit(registry.url).netloc
        for device_id, files in devices.items():
            register(operator, files, device_id)
        assert operator.get("/revocations").status_code == 200  # the epoch is drawn
        with sqlite3.connect(first_db) as source, sqlite3.connect(backup_db) as copy:
            source.backup(copy)  # every device registered, no revocation yet
        _decommission(operator, "dev-cp-0")  # seq 1 in this history
        settings = broker_settings(
            layout,
            registry_url=registry.url,
            broker_feed_wait_s=1,
            broker_feed_max_backoff_s=0.2,
            broker_feed_resync_s=1.0,
        )
        broker = BrokerServer(settings).start()
        app = broker.app
        assert app is not None and app.follower is not None
        follower = app.follower
        if not wait_for(lambda: follower.after == 1 and follower.synced.is_set()):
            broker.stop()
            raise AssertionError("the broker never caught up with the first registry")
    try:
        live = connect(broker.port, devices["dev-cp-1"], "dev-cp-1")
        assert live.connected.is_set(), live.reason
        # The restored copy moves on (elsewhere) before the broker reaches it: seq 1 is
        # another event there, and its head (2) is past the broker's position (1).
        (pki.layout.root / MARK_FILE).unlink(missing_ok=True)  # the mark did not survive
        with _registry(pki, backup_db) as (_elsewhere, operator):
            _decommission(operator, "dev-cp-1")
            _decommission(operator, "dev-cp-2")
        with _registry(pki, backup_db, addr):
            assert live.disconnected.wait(10), "the event at the checkpoint was never re-read"
            assert follower.checks >= 1 and follower.resyncs >= 1
        for device_id, files in devices.items():
            assert _refused(broker, files, device_id), device_id
        live.close()
    finally:
        broker.stop()
