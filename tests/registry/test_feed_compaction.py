"""Compacting the revocation feed: the sequence stays, a follower below the floor is told to
read the snapshot (answered at once), the snapshot holds exactly the live revoked state."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable

import httpx
from sqlmodel import Session, col, select

from factory.ca import IssuedCertificate
from fleetcore.clock import utcnow
from fleetcore.profile import IdentityKind
from fleetcore.revocation_feed import (
    FOLLOWER_KINDS,
    SNAPSHOT_NEXT_HEADER,
    RevocationFeed,
    RevocationSnapshot,
)
from registry.models import Revocation
from registry.server import RegistryServer
from registry.store.revocations import compact_feed
from tests.support.feed import age, decommissioned
from tests.support.processes import certfleet_in_process
from tests.support.registry_fixtures import Clients

Mint = Callable[..., IssuedCertificate]


def test_compaction_keeps_the_sequence_and_sends_followers_below_the_floor_to_the_snapshot(
    operator: httpx.Client, mint: Mint, clients: Clients, registry: RegistryServer
) -> None:
    ids = [f"cmp-{i}" for i in range(1, 6)]
    serials = decommissioned(operator, mint, ids)  # events 1..5
    age(registry, ["cmp-1", "cmp-2", "cmp-4"])
    data_dir = str(registry.settings.layout.root)
    url = registry.settings.registry_database_url
    result = certfleet_in_process(
        "registry", "feed-compact", "--grace-days", "30", "--json", "--data-dir", data_dir,
        env={"CERTFLEET_REGISTRY_DATABASE_URL": url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"removed": 3, "floor": 4, "head_seq": 5}

    broker = clients.of(IdentityKind.SERVICE, "broker")
    kinds = {"kinds": FOLLOWER_KINDS}
    # At or above the floor: the tail, its sequence numbers unchanged.
    tail = RevocationFeed.model_validate(
        broker.get("/revocations", params={"after": 2, **kinds}).json()
    )
    assert tail.snapshot_required
    tail = RevocationFeed.model_validate(
        broker.get("/revocations", params={"after": 4, **kinds}).json()
    )
    assert [(e.seq, e.device_id) for e in tail.events] == [(5, "cmp-5")]
    assert not tail.snapshot_required
    everything = RevocationFeed.model_validate(
        broker.get("/revocations", params={"after": 3, **kinds}).json()
    )
    assert everything.snapshot_required and everything.events == []
    # Below the floor: told at once, even on a long poll.
    started = time.monotonic()
    below = RevocationFeed.model_validate(
        broker.get("/revocations", params={"after": 0, "wait": 30, **kinds}).json()
    )
    assert time.monotonic() - started < 20  # not the 30 s long poll waited out
    assert below.snapshot_required and below.events == [] and below.last_seq == 0
    assert below.head_seq == 5

    snapshot = RevocationSnapshot.model_validate(broker.get("/revocations/snapshot").json())
    assert (snapshot.head_seq, snapshot.floor, snapshot.epoch) == (5, 4, below.epoch)
    assert set(snapshot.not_after) == {serials["cmp-3"], serials["cmp-5"]}
    assert sorted(snapshot.devices) == ids
    assert snapshot.issuers == []

    # The sequence goes on from the head; compacting again removes nothing more.
    decommissioned(operator, mint, ["cmp-6"])
    after = RevocationFeed.model_validate(
        broker.get("/revocations", params={"after": 4, **kinds}).json()
    )
    assert [e.seq for e in after.events] == [5, 6]
    with Session(registry.state.engine) as session:
        again = compact_feed(session, utcnow() - dt.timedelta(days=30))
        remaining = session.exec(select(Revocation.seq).order_by(col(Revocation.seq))).all()
    assert (again.removed, again.floor, again.head_seq) == (0, 4, 6)
    assert list(remaining) == [3, 5, 6]


def test_snapshot_needs_a_reader(clients: Clients) -> None:
    device = clients.of(IdentityKind.DEVICE, "dev-snoop")
    assert device.get("/revocations/snapshot").status_code == 403
    assert clients.make().get("/revocations/snapshot").status_code == 401


def test_the_snapshot_in_pages_is_the_whole_snapshot(
    operator: httpx.Client, mint: Mint, clients: Clients, registry: RegistryServer
) -> None:
    ids = [f"page-{i}" for i in range(1, 8)]
    serials = decommissioned(operator, mint, ids)
    age(registry, ["page-4"])  # expired: in no page, though the walk passes its serial
    broker = clients.of(IdentityKind.SERVICE, "broker")
    whole = RevocationSnapshot.model_validate(broker.get("/revocations/snapshot").json())
    assert whole.next_after is None
    pages: list[RevocationSnapshot] = []
    params: dict[str, str | int] = {"limit": 2}
    while len(pages) < 20:
        answer = broker.get("/revocations/snapshot", params=params)
        pages.append(RevocationSnapshot.model_validate(answer.json()))
        # the next page's start is also a header (asked for before this page is parsed)
        assert answer.headers.get(SNAPSHOT_NEXT_HEADER) == pages[-1].next_after
        if pages[-1].next_after is None:
            break
        params["after_serial"] = pages[-1].next_after
    assert pages[-1].next_after is None
    paged = {s: when for page in pages for s, when in page.not_after.items()}
    assert paged == whole.not_after  # every live serial once, none expired
    assert set(paged) == {serials[i] for i in ids if i != "page-4"}
    assert sum(len(page.not_after) for page in pages) == len(paged)
    assert pages[0].devices == whole.devices and sorted(whole.devices) == ids
    assert all(page.devices == [] for page in pages[1:])  # devices with the first page only
    assert {page.head_seq for page in pages} == {whole.head_seq}
    for bad in ({"after_serial": "XYZ"}, {"limit": 0}, {"limit": 10**6}):
        assert broker.get("/revocations/snapshot", params=bad).status_code == 422, bad
