"""The revocation feed: gap-free under concurrency, long-poll wakes on commit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from factory.ca import IssuedCertificate
from fleetcore.profile import IdentityKind
from fleetcore.revocation_feed import RevocationFeed
from registry.server import RegistryServer
from tests.support.pki import pem
from tests.support.registry_fixtures import Clients
from tests.support.tls import tls_context

Mint = Callable[..., IssuedCertificate]


def register_many(operator: httpx.Client, mint: Mint, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    body = {"devices": [{"certificate_pem": pem(mint(device_id))} for device_id in ids]}
    assert operator.post("/devices/batch", json=body).status_code == 200
    return ids


def test_empty_feed_answers_at_once(clients: Clients) -> None:
    broker = clients.of(IdentityKind.SERVICE, "broker")
    body = broker.get("/revocations").json()
    epoch = body.pop("epoch")
    assert body == {"events": [], "last_seq": 0, "head_seq": 0, "snapshot_required": False}
    again = broker.get("/revocations", params={"after": 7}).json()
    assert again["last_seq"] == 7
    # The feed's epoch is drawn once per database and stays.
    assert isinstance(epoch, int) and epoch > 0 and again["epoch"] == epoch


def test_concurrent_decommissions_get_gap_free_sequence_numbers(
    operator: httpx.Client, mint: Mint, clients: Clients
) -> None:
    ids = register_many(operator, mint, "race", 24)
    callers = [clients.of(IdentityKind.OPERATOR, "alice") for _ in range(6)]

    def decommission(index: int) -> int:
        http = callers[index % len(callers)]
        response = http.post(f"/devices/{ids[index]}/decommission", json={"reason": "race"})
        assert response.status_code == 200, response.text
        return int(response.json()["revocation_seq"])

    with ThreadPoolExecutor(max_workers=6) as pool:
        seqs = sorted(pool.map(decommission, range(len(ids))))
    assert seqs == list(range(1, len(ids) + 1))
    feed = operator.get("/revocations", params={"after": 0}).json()
    assert [e["seq"] for e in feed["events"]] == seqs
    assert sorted(e["device_id"] for e in feed["events"]) == sorted(ids)
    assert feed["last_seq"] == feed["head_seq"] == len(ids)


def test_feed_pages_with_limit(operator: httpx.Client, mint: Mint) -> None:
    for device_id in register_many(operator, mint, "page", 5):
        operator.post(f"/devices/{device_id}/decommission", json={"reason": "p"})
    first = operator.get("/revocations", params={"after": 0, "limit": 2}).json()
    assert [e["seq"] for e in first["events"]] == [1, 2]
    assert (first["last_seq"], first["head_seq"]) == (2, 5)
    rest = operator.get("/revocations", params={"after": first["last_seq"], "limit": 10}).json()
    assert [e["seq"] for e in rest["events"]] == [3, 4, 5]


def test_long_poll_returns_when_a_device_is_decommissioned(
    operator: httpx.Client, mint: Mint, clients: Clients, registry: RegistryServer
) -> None:
    (device_id,) = register_many(operator, mint, "poll", 1)
    broker = clients.of(IdentityKind.SERVICE, "broker")
    result: dict[str, object] = {}

    def wait() -> None:
        started = time.monotonic()
        result["body"] = broker.get("/revocations", params={"after": 0, "wait": 30}).json()
        result["received_at"] = time.monotonic()
        result["waited"] = time.monotonic() - started

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 10
    while registry.state.feed.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert registry.state.feed.waiting == 1
    gauge = registry.state.metrics.registry.get_sample_value("certfleet_registry_feed_waiters")
    assert gauge == 1
    sent = time.monotonic()
    operator.post(f"/devices/{device_id}/decommission", json={"reason": "now"})
    waiter.join(10)
    body = result["body"]
    assert isinstance(body, dict)
    assert [e["device_id"] for e in body["events"]] == [device_id]
    assert float(result["received_at"]) - sent < 1.0  # type: ignore[arg-type]


def test_long_poll_times_out_empty(clients: Clients) -> None:
    broker = clients.of(IdentityKind.SERVICE, "broker")
    started = time.monotonic()
    body = broker.get("/revocations", params={"after": 0, "wait": 0.5}).json()
    elapsed = time.monotonic() - started
    assert {key: body[key] for key in ("events", "last_seq", "head_seq")} == {
        "events": [],
        "last_seq": 0,
        "head_seq": 0,
    }
    assert 0.4 < elapsed < 5


def test_long_poll_sees_revocations_written_by_another_process(
    clients: Clients, registry: RegistryServer, mint: Mint, operator: httpx.Client
) -> None:
    """A second registry on the same database (another process in production) decommissions;
    the first one's waiter sees it through its bounded re-read."""
    (device_id,) = register_many(operator, mint, "other", 1)
    with RegistryServer(registry.settings) as second:
        other = clients.pki.client(IdentityKind.OPERATOR, "alice")
        with httpx.Client(
            base_url=f"{second.url}/api/v1", verify=tls_context(clients.pki, other)
        ) as http:
            broker = clients.of(IdentityKind.SERVICE, "broker")
            result: dict[str, object] = {}
            waiter = threading.Thread(
                target=lambda: result.update(
                    body=broker.get("/revocations", params={"after": 0, "wait": 20}).json()
                )
            )
            waiter.start()
            deadline = time.monotonic() + 10
            while registry.state.feed.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert (
                http.post(f"/devices/{device_id}/decommission", json={"reason": "x"}).status_code
                == 200
            )
            waiter.join(10)
    body = result["body"]
    assert isinstance(body, dict)
    assert [e["device_id"] for e in body["events"]] == [device_id]


def test_feed_parameters_are_validated(clients: Clients) -> None:
    broker = clients.of(IdentityKind.SERVICE, "broker")
    assert broker.get("/revocations", params={"wait": 61}).status_code == 422
    assert broker.get("/revocations", params={"after": -1}).status_code == 422
    assert broker.get("/revocations", params={"limit": 5001}).status_code == 422
    assert broker.get("/revocations", params={"limit": 0}).status_code == 422


def test_many_parked_long_polls_share_one_read_and_healthz_answers_meanwhile(
    operator: httpx.Client, mint: Mint, clients: Clients, registry: RegistryServer
) -> None:
    """Followers parked on the feed (real HTTPS long-polls) all get the decommission; the
    publication that wakes them costs one read of the feed, not one each; ``/healthz``
    answers while they are parked."""
    (device_id,) = register_many(operator, mint, "many", 1)
    followers = 40
    files = clients.pki.client(IdentityKind.SERVICE, "broker")
    limits = httpx.Limits(max_connections=followers + 1, max_keepalive_connections=followers + 1)
    head = operator.get("/healthz").json()["head_seq"]
    params = {"after": head, "wait": 30, "kinds": "decommission,superseded"}
    reads_before = 0

    async def follow_all() -> list[httpx.Response]:
        nonlocal reads_before
        async with httpx.AsyncClient(
            base_url=f"{registry.url}/api/v1",
            verify=tls_context(clients.pki, files),
            limits=limits,
            timeout=30,
        ) as http:
            polls = [
                asyncio.create_task(http.get("/revocations", params=params))
                for _ in range(followers)
            ]
            deadline = time.monotonic() + 20
            while registry.state.feed.waiting < followers:
                assert time.monotonic() < deadline, f"{registry.state.feed.waiting} parked"
                await asyncio.sleep(0.01)
            health = await http.get("/healthz")
            assert health.status_code == 200 and health.json()["head_seq"] == head
            assert not any(poll.done() for poll in polls)
            reads_before = registry.state.feed_reads.reads
            decommissioned = await asyncio.to_thread(
                operator.post, f"/devices/{device_id}/decommission", json={"reason": "many"}
            )
            assert decommissioned.status_code == 200, decommissioned.text
            return await asyncio.gather(*polls)

    answers = asyncio.run(follow_all())
    # One read for the publication (two on PostgreSQL, whose LISTEN publishes it again),
    # however many followers it woke.
    assert registry.state.feed_reads.reads - reads_before <= 2
    expected = operator.get("/revocations", params={"after": head, "kinds": params["kinds"]})
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        feed = RevocationFeed.model_validate_json(answer.content)
        assert [(e.seq, e.device_id) for e in feed.events] == [(head + 1, device_id)]
        assert answer.json() == expected.json()  # the same answer as a plain read
