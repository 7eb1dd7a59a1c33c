"""A broker far behind a compacted feed catches up from the registry's snapshot plus the
tail, and ends with exactly the live revoked set (a real registry and a real broker)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, col, select

from broker import revocation
from broker.revoked_set import RevokedSet
from broker.server import BrokerApp, BrokerServer
from factory.ca import IssuedCertificate
from fleetcore.clock import utcnow
from fleetcore.profile import CLOCK_SKEW, IdentityKind
from fleetcore.revocation_feed import RevocationSnapshot
from registry.models import Certificate, Device
from registry.server import RegistryServer
from registry.store.revocations import compact_feed
from tests.support.feed import age, decommissioned
from tests.support.pki import TestPKI
from tests.support.servers import broker_settings, feed_broker_layout
from tests.support.waits import wait_for


def live_state(registry: RegistryServer) -> tuple[set[str], set[str]]:
    """The registry's revoked serials not yet expired, and its decommissioned devices."""
    limit = utcnow() - CLOCK_SKEW
    with Session(registry.state.engine) as session:
        serials = session.exec(
            select(Certificate.serial).where(
                col(Certificate.status) == "revoked", col(Certificate.not_after) > limit
            )
        ).all()
        devices = session.exec(
            select(Device.device_id).where(col(Device.status) == "decommissioned")
        ).all()
    return {s.lower() for s in serials}, set(devices)


def _minter(pki: TestPKI) -> Callable[[str], IssuedCertificate]:
    """A device certificate of the test CA for a device id."""

    def mint(device_id: str) -> IssuedCertificate:
        return pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, device_id))

    return mint


def _caught_up_by_snapshot(broker: BrokerServer, seq: int) -> tuple[BrokerApp, Any]:
    """The broker's app and follower once it has followed to ``seq`` through exactly one
    snapshot and no resync."""
    app = broker.app
    assert app is not None and app.follower is not None
    follower = app.follower
    assert wait_for(lambda: follower.after == seq and follower.synced.is_set())
    assert follower.snapshots == 1 and follower.resyncs == 0
    return app, follower


def test_broker_below_the_floor_catches_up_from_the_snapshot_and_the_tail(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    tmp_path: Path,
) -> None:
    mint = _minter(pki)
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    settings = broker_settings(layout, registry_url=registry.url, broker_feed_wait_s=30)
    serials = decommissioned(operator, mint, ["far-1", "far-2"])  # events 1, 2
    age(registry, ["far-1", "far-2"])  # expired long ago: the broker keeps the devices only
    with BrokerServer(settings) as broker:
        app = broker.app
        assert app is not None and app.follower is not None
        follower = app.follower
        assert wait_for(lambda: follower.after == 2 and follower.synced.is_set())
        assert app.revoked.hex_serials() == set()
        assert app.revoked.is_device_decommissioned("far-2")
    # While the broker is away: more events, then a compaction past its position (2).
    serials |= decommissioned(operator, mint, ["far-3", "far-4", "far-5"])  # events 3, 4, 5
    age(registry, ["far-3"])
    with Session(registry.state.engine) as session:
        compacted = compact_feed(session, utcnow() - dt.timedelta(days=30))
    assert (compacted.removed, compacted.floor) == (3, 3)

    with BrokerServer(settings) as broker:
        app, follower = _caught_up_by_snapshot(broker, 5)
        # and the tail after the snapshot's head, as usual
        serials |= decommissioned(operator, mint, ["far-6"])  # event 6
        assert wait_for(lambda: follower.after == 6)
        live_serials, live_devices = live_state(registry)
        assert live_serials == {serials[d] for d in ("far-4", "far-5", "far-6")}
        assert app.revoked.hex_serials() == live_serials  # exactly the live set
        assert {f"far-{i}" for i in range(1, 7)} == live_devices
        assert all(app.revoked.is_device_decommissioned(d) for d in live_devices)


def test_a_broker_far_behind_reads_the_snapshot_in_pages_instead_of_replaying(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At a million devices a first start would replay some 530,000 events; past
    # SNAPSHOT_GAP events behind, a catching-up broker reads the live state in pages of
    # SNAPSHOT_PAGE serials instead (here 3 events and pages of 2 serials).
    monkeypatch.setattr(revocation, "SNAPSHOT_GAP", 3)
    monkeypatch.setattr(revocation, "SNAPSHOT_PAGE", 2)

    mint = _minter(pki)
    names = [f"gap-{i}" for i in range(1, 8)]
    serials = decommissioned(operator, mint, names)  # events 1..7, nothing compacted
    age(registry, ["gap-1"])  # expired: not in the snapshot, the device is
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    settings = broker_settings(layout, registry_url=registry.url, broker_feed_wait_s=30)
    with BrokerServer(settings) as broker:
        app, follower = _caught_up_by_snapshot(broker, 7)
        live_serials, live_devices = live_state(registry)
        assert live_serials == {serials[n] for n in names[1:]}  # six serials: three pages
        assert app.revoked.hex_serials() == live_serials
        assert all(app.revoked.is_device_decommissioned(d) for d in live_devices)
        assert set(names) == live_devices
        # then the tail, one event at a time as usual (1 behind: no snapshot)
        serials |= decommissioned(operator, mint, ["gap-8"])
        assert wait_for(lambda: follower.after == 8)
        assert follower.snapshots == 1
        assert serials["gap-8"] in app.revoked.hex_serials()


def test_only_the_last_page_of_a_snapshot_reports_the_head_applied() -> None:
    page = RevocationSnapshot(
        head_seq=900,
        epoch=1,
        floor=0,
        read_at=utcnow(),
        not_after={"0a": utcnow(), "0b": utcnow()},
        devices=["d-1"],
        issuers=[],
        next_after="0b",
    )
    ready = revocation._snapshot_page(page.model_dump_json().encode(), 40)
    # more pages follow: serials, devices and the callback's event all at the position
    assert ready.seq == 40 and ready.event.seq == 40
    device = ready.decommission("d-1")
    assert (device.seq, device.kind, device.device_id) == (40, "decommission", "d-1")
    assert [json.loads(line)["seq"] for _, line in ready.encoded()] == [40]
    last = page.model_copy(update={"next_after": None})
    ready = revocation._snapshot_page(last.model_dump_json().encode(), 40)
    assert ready.seq == 900 and ready.decommission("d-1").seq == 900
    assert sorted(serial for entries, _ in ready.encoded() for _, _, serial in entries) == [
        "0a",
        "0b",
    ]
    assert [json.loads(line)["seq"] for _, line in ready.encoded()] == [900]


def test_a_snapshot_page_leaves_expired_serials_out_and_chunks_the_rest() -> None:
    now = utcnow()
    gone = now - CLOCK_SKEW - dt.timedelta(seconds=5)
    not_after = {f"{n:04x}": now + dt.timedelta(days=1) for n in range(1, 1201)}
    not_after["ffff"] = gone
    page = RevocationSnapshot(
        head_seq=5, epoch=1, floor=0, read_at=now, not_after=not_after, devices=[], issuers=[]
    )
    ready = revocation._snapshot_page(page.model_dump_json().encode(), 0)
    sizes = [len(entries) for entries, _ in ready.encoded()]
    assert sizes == [revocation.SNAPSHOT_CHUNK, revocation.SNAPSHOT_CHUNK, 200]
    revoked = RevokedSet(None)
    for entries, line in ready.encoded():
        revoked.add_encoded(entries, line, ready.seq)
    assert revoked.serial_count == 1200 and not revoked.is_serial_revoked("ffff")
    assert revoked.add_devices(["d-1", "d-2"], 5) == ["d-1", "d-2"]
    assert revoked.add_devices(["d-2", "d-3"], 5) == ["d-3"]  # known ones: nothing again
    assert revoked.is_device_decommissioned("d-3")
    assert revoked.is_serial_revoked("04B0")  # 1200, any case
