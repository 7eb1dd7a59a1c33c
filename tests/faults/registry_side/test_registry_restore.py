"""A registry database restored from an older copy (issue 11.5, registry side): the feed's
position does not go backwards silently. The registry notices at start (its head is below
the mark it keeps in the data folder), logs and counts it, and draws a new feed epoch, so
every broker re-reads the feed from 0."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from factory.ca import IssuedCertificate
from fleetcore.profile import IdentityKind
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.support.pki import TestPKI, pem, unique_id
from tests.support.registry_fixtures import Clients

Mint = Callable[..., IssuedCertificate]


def _decommission(server: RegistryServer, pki: TestPKI, mint: Mint, count: int) -> dict[str, int]:
    """Register and decommission ``count`` devices; the feed as the broker sees it."""
    clients = Clients(pki, server.url, [])
    try:
        operator = clients.of(IdentityKind.OPERATOR, "alice")
        for _ in range(count):
            device_id = unique_id("restore")
            assert operator.post("/devices", json={"certificate_pem": pem(mint(device_id))})
            answer = operator.post(f"/devices/{device_id}/decommission", json={"reason": "r"})
            assert answer.status_code == 200, answer.text
        broker = clients.of(IdentityKind.SERVICE, "broker")
        feed = broker.get("/revocations", params={"after": 0}).json()
        return {"epoch": feed["epoch"], "head_seq": feed["head_seq"]}
    finally:
        for http in clients.opened:
            http.close()


def test_a_database_restored_from_an_older_copy_gets_a_new_feed_epoch(
    pki: TestPKI, mint: Mint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(
        pki.layout.root, data, ignore=shutil.ignore_patterns("registry-feed.json", "*.db*")
    )
    database = tmp_path / "registry.db"
    settings = RegistrySettings(
        data_dir=data, registry_addr="127.0.0.1:0", registry_database_url=f"sqlite:///{database}"
    )
    with RegistryServer(settings) as server:
        backup_feed = _decommission(server, pki, mint, 1)
    shutil.copy(database, tmp_path / "backup.db")  # the nightly copy (closed: WAL folded in)
    with RegistryServer(settings) as server:
        seen = _decommission(server, pki, mint, 2)
    assert seen == {"epoch": backup_feed["epoch"], "head_seq": 3}

    for leftover in tmp_path.glob("registry.db-*"):
        leftover.unlink()
    shutil.copy(tmp_path / "backup.db", database)
    with (
        caplog.at_level(logging.ERROR, logger="registry.feedmark"),
        RegistryServer(settings) as server,
    ):
        restored = _decommission(server, pki, mint, 0)
        restores = server.state.metrics.registry.get_sample_value(
            "certfleet_registry_feed_restores_total"
        )
    assert restored["head_seq"] == 1
    assert restored["epoch"] != seen["epoch"]  # a broker at position 3 must start over
    assert restores == 1
    assert "restored from an older copy: feed head 1 is below 3" in caplog.text

    # A normal restart is not a restore: the epoch stays.
    with RegistryServer(settings) as server:
        again = _decommission(server, pki, mint, 0)
    assert again == restored
