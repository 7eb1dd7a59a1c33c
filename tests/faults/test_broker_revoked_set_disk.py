"""The revoked set's folder fails (replaced by a file, full): revocation goes on.

Every decommission is still applied and enforced at once; the failure shows in the log, in
``certfleet_broker_revoked_set_persisted`` / ``..._write_failures_total`` and on
``/healthz``; the file is written as soon as the disk is back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.auth import Refusal
from broker.revoked_set import RevokedSet
from broker.server import BrokerServer
from fleetcore.layout import DataLayout
from registry.server import RegistryServer
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.servers import broker_settings, feed_broker_layout, register
from tests.support.waits import wait_for


def _health(broker: BrokerServer) -> tuple[int, dict[str, object]]:
    assert broker.metrics_url is not None
    response = httpx.get(broker.metrics_url.replace("/metrics", "/healthz"), timeout=5)
    return response.status_code, response.json()


def _gauge(broker: BrokerServer, name: str) -> float | None:
    return broker.metrics.registry.get_sample_value(name)


def _decommission_and_check_dropped(
    pki: TestPKI, broker: BrokerServer, operator: httpx.Client, tmp_path: Path, device_id: str
) -> None:
    files = issue_device(pki, tmp_path, device_id)
    register(operator, files, device_id)
    device = connect(broker.port, files, device_id)
    try:
        assert device.connected.is_set(), device.reason
        response = operator.post(f"/devices/{device_id}/decommission", json={"reason": "lost"})
        assert response.status_code == 200, response.text
        assert device.disconnected.wait(10), f"{device_id} was not dropped"
    finally:
        device.close()
    before = broker.metrics.refusal_count(Refusal.REVOKED.value)
    again = connect(broker.port, files, device_id)
    try:
        assert not again.connected.is_set()
        assert broker.metrics.refusal_count(Refusal.REVOKED.value) == before + 1
    finally:
        again.close()


def _persisted_serials(folder: Path) -> int:
    """How many serials a broker starting from ``folder`` would enforce."""
    persisted = RevokedSet(folder)
    persisted.load()
    return persisted.serial_count


@pytest.fixture
def feed_layout(pki: TestPKI, tmp_path: Path) -> DataLayout:
    return feed_broker_layout(pki, tmp_path / "broker-data")


def test_revocation_goes_on_when_the_state_folder_is_a_file(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    tmp_path: Path,
    feed_layout: DataLayout,
) -> None:
    folder = feed_layout.broker_dir
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")  # works against root too, unlike chmod
    settings = broker_settings(feed_layout, registry_url=registry.url, broker_feed_wait_s=30)
    with BrokerServer(settings) as broker:
        for n in range(3):  # the follower used to die after the first failed write
            _decommission_and_check_dropped(pki, broker, operator, tmp_path, f"dev-file-{n}")
        assert _gauge(broker, "certfleet_broker_revoked_set_persisted") == 0
        failures = _gauge(broker, "certfleet_broker_revoked_set_write_failures_total")
        assert failures is not None and failures >= 3
        status, body = _health(broker)
        assert status == 503 and "revoked set not persisted" in str(body["problems"])
        # The operator puts the folder back: the retry (backoff) writes every serial.
        folder.unlink()
        folder.mkdir()
        state = folder / "revoked-broker.snapshot"
        assert wait_for(state.exists, timeout=20)
        assert _persisted_serials(folder) == 3
        assert wait_for(lambda: _health(broker)[0] == 200, timeout=5)
        assert _gauge(broker, "certfleet_broker_revoked_set_persisted") == 1


def _mount(*argv: str, what: str) -> None:
    """Run mount(8) or skip visibly: these faults need root and a kernel that lets us mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"{what} needs root and mount(8)")
    result = subprocess.run(
        ["mount", *argv], capture_output=True, text=True, timeout=10, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()}); {what} not tested")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], timeout=10, check=False)


@contextlib.contextmanager
def _tiny_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(where), what="the ENOSPC test")
    try:
        yield where
    finally:
        _umount(where)


def test_revocation_goes_on_when_the_state_folder_is_read_only(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    tmp_path: Path,
    feed_layout: DataLayout,
) -> None:
    """A read-only bind mount: refuses root too (chmod would not)."""
    folder = feed_layout.broker_dir
    folder.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(folder), str(folder), what="the read-only folder test")
    try:
        _mount("-o", "remount,ro,bind", str(folder), what="the read-only folder test")
        settings = broker_settings(feed_layout, registry_url=registry.url, broker_feed_wait_s=30)
        with BrokerServer(settings) as broker:
            for n in range(2):
                _decommission_and_check_dropped(pki, broker, operator, tmp_path, f"dev-ro-{n}")
            status, body = _health(broker)
            assert status == 503 and "Read-only file system" in str(body["problems"])
            _umount(folder)  # writable again
            state = folder / "revoked-broker.snapshot"
            assert wait_for(state.exists, timeout=20)
            assert _persisted_serials(folder) == 2
            assert wait_for(lambda: _health(broker)[0] == 200, timeout=5)
    finally:
        _umount(folder)


def test_revocation_goes_on_when_the_disk_is_full(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    tmp_path: Path,
    feed_layout: DataLayout,
) -> None:
    with _tiny_tmpfs(feed_layout.broker_dir) as folder:
        filler = folder / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 1024)
                out.flush()
        settings = broker_settings(feed_layout, registry_url=registry.url, broker_feed_wait_s=30)
        with BrokerServer(settings) as broker:
            for n in range(2):
                _decommission_and_check_dropped(pki, broker, operator, tmp_path, f"dev-full-{n}")
            status, body = _health(broker)
            assert status == 503 and "No space left" in str(body["problems"])
            filler.unlink()  # space again
            state = folder / "revoked-broker.snapshot"
            assert wait_for(state.exists, timeout=20)
            assert _persisted_serials(folder) == 2
            assert wait_for(lambda: _health(broker)[0] == 200, timeout=5)
