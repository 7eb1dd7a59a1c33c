"""Two registry processes on one PostgreSQL database serve one fleet (issue 13, replicas).

Real ``certfleet registry serve`` subprocesses (replicas ``a`` and ``b``) on one scratch
PostgreSQL database, our broker in this process, real paho clients:

- a decommission on one replica wakes a long-poll on the other within a second (LISTEN/NOTIFY;
  the long-poll's own re-read is set to 10 s, so only the notification can be that fast);
- the LISTEN connection killed (``pg_terminate_backend``): the feed still wakes, nothing missed;
- CRL numbers strictly increase across signatures alternating between the replicas;
- a renewal request published once is answered exactly once although both replicas receive
  it, and the renewal rate limit counts each request once across the two.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography import x509

from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.faults.registry_side.registry_process import RegistryProcess, registry_process
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import ClientFiles, TestPKI, registry_data_dir, write_device_bundle
from tests.support.postgres import reset_postgres
from tests.support.servers import certfleet_broker_settings
from tests.support.waits import must_wait_for

pytestmark = pytest.mark.postgres

#: The long-polls' own re-read: long enough that only a notification wakes them within 1 s.
FEED_POLL_S = 10
MAX_ATTEMPTS = 3


@dataclass
class Replica:
    name: str
    process: RegistryProcess
    client: httpx.Client

    def metric(self, name: str) -> float:
        """The value of one unlabelled sample (or a sample given with its labels), 0 if absent."""
        text = self.client.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


@dataclass
class Pair:
    pki: TestPKI
    database_url: str
    a: Replica
    b: Replica
    fleet_dir: Path
    broker: BrokerServer | None

    def register(self, device_id: str) -> Path:
        write_device_bundle(self.pki.ca, self.fleet_dir, device_id)
        directory = self.fleet_dir / "devices" / device_id
        response = self.a.client.post(
            "/devices", json={"certificate_pem": (directory / "device.crt").read_text()}
        )
        assert response.status_code == 201, response.text
        return directory


def _operator_client(pki: TestPKI, url: str) -> httpx.Client:
    operator = pki.client(IdentityKind.OPERATOR, "alice")
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(operator.cert), str(operator.key))
    return httpx.Client(base_url=f"{url}/api/v1", verify=context, timeout=30)


def _wait_for_metric(replica: Replica, name: str, value: float) -> None:
    must_wait_for(lambda: replica.metric(name) == value, f"{name} = {value} on {replica.name}")


@pytest.fixture
def scratch_database(postgres_database: str) -> str:
    reset_postgres(postgres_database)
    return postgres_database


def _pair(
    pki: TestPKI,
    database_url: str,
    root: Path,
    broker: BrokerServer | None,
    *,
    shared_groups: bool = True,
) -> Iterator[Pair]:
    env = {
        "CERTFLEET_REGISTRY_MQTT_SHARED": "true" if shared_groups else "false",
        "CERTFLEET_REGISTRY_FEED_POLL_SECONDS": str(FEED_POLL_S),
        "CERTFLEET_REGISTRY_RENEWAL_MIN_INTERVAL_S": "120",
        "CERTFLEET_REGISTRY_RENEWAL_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    }
    if broker is not None:
        env["CERTFLEET_TELEMETRY_BROKER_ADDR"] = f"127.0.0.1:{broker.port}"
    with ExitStack() as stack:
        replicas = []
        for name in ("a", "b"):  # one after the other: a is up (and migrated) before b starts
            process = stack.enter_context(
                registry_process(
                    pki,
                    database_url,
                    root / f"{name}.ready.json",
                    # Each replica's own data folder: the CA (it signs) and its MQTT identity.
                    data_dir=registry_data_dir(pki, root / name),
                    env={**env, "CERTFLEET_REGISTRY_INSTANCE": name},
                    log_file=root / f"{name}.log",
                )
            )
            client = stack.enter_context(_operator_client(pki, process.url))
            replicas.append(Replica(name, process, client))
        for replica in replicas:
            _wait_for_metric(replica, "certfleet_registry_feed_listener_connected", 1)
        yield Pair(pki, database_url, replicas[0], replicas[1], root / "fleet", broker)


@pytest.fixture
def pair(pki: TestPKI, scratch_database: str, tmp_path: Path) -> Iterator[Pair]:
    """Two replicas without a broker (the feed and the CRL)."""
    yield from _pair(pki, scratch_database, tmp_path, None)


def _pair_with_broker(
    pki: TestPKI, database_url: str, root: Path, *, shared_groups: bool
) -> Iterator[Pair]:
    with BrokerServer(certfleet_broker_settings(pki, root / "broker-data")) as broker:
        for made in _pair(pki, database_url, root, broker, shared_groups=shared_groups):
            for replica in (made.a, made.b):
                _wait_for_metric(replica, "certfleet_registry_telemetry_subscribed", 1)
            yield made


@pytest.fixture
def pair_with_broker(pki: TestPKI, scratch_database: str, tmp_path: Path) -> Iterator[Pair]:
    """Two replicas subscribed to our broker through the shared groups (the default): each
    renewal request reaches one of them."""
    yield from _pair_with_broker(pki, scratch_database, tmp_path, shared_groups=True)


@pytest.fixture
def pair_both_subscribed(pki: TestPKI, scratch_database: str, tmp_path: Path) -> Iterator[Pair]:
    """Two replicas with plain subscriptions (``CERTFLEET_REGISTRY_MQTT_SHARED=false``): both
    receive every renewal request, and the database claim lets one answer (the safety net)."""
    yield from _pair_with_broker(pki, scratch_database, tmp_path, shared_groups=False)


class LongPoll:
    """``GET /revocations?after=&wait=`` on its own thread; when it returned, and what."""

    def __init__(self, replica: Replica, after: int, wait: float = 30) -> None:
        self.returned_at: float | None = None
        self.body: dict[str, object] = {}
        self._thread = threading.Thread(target=self._run, args=(replica, after, wait))
        self._thread.start()

    def _run(self, replica: Replica, after: int, wait: float) -> None:
        response = replica.client.get("/revocations", params={"after": after, "wait": wait})
        self.returned_at = time.monotonic()
        self.body = response.json()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the long-poll did not return"


def _head(replica: Replica) -> int:
    return int(replica.client.get("/revocations").json()["head_seq"])


def _waiting(replica: Replica, count: int = 1) -> None:
    must_wait_for(
        lambda: replica.metric("certfleet_registry_feed_waiters") >= count,
        f"a long-poll waiting on replica {replica.name}",
    )


def _decommission(replica: Replica, device_id: str) -> float:
    response = replica.client.post(
        f"/devices/{device_id}/decommission", json={"reason": "replica test"}
    )
    assert response.status_code == 200, response.text
    return time.monotonic()


def _events(poll: LongPoll) -> list[str]:
    events = poll.body["events"]
    assert isinstance(events, list)
    return [str(event["device_id"]) for event in events]


@pytest.mark.alone  # a long-poll woken within a bound (1 s, 3 s)
def test_a_decommission_on_one_replica_wakes_the_long_poll_on_the_other(pair: Pair) -> None:
    for device_id in ("dev-rep-1", "dev-rep-2"):
        pair.register(device_id)
    for source, waiter, device_id in ((pair.a, pair.b, "dev-rep-1"), (pair.b, pair.a, "dev-rep-2")):
        poll = LongPoll(waiter, _head(waiter))
        _waiting(waiter)
        committed = _decommission(source, device_id)
        poll.join(FEED_POLL_S)
        assert poll.returned_at is not None
        assert poll.returned_at - committed < 1.0, f"{waiter.name} woke late"
        assert _events(poll) == [device_id]
    assert pair.b.metric("certfleet_registry_feed_notifications_total") >= 1


def _terminate_listener(database_url: str, instance: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"certfleet-feed-listener/{instance}",),
        ).fetchall()
    return len(rows)


@pytest.mark.alone  # a long-poll woken within a bound (1 s, 3 s)
def test_a_killed_listen_connection_misses_nothing(pair: Pair) -> None:
    for device_id in ("dev-cut-1", "dev-cut-2"):
        pair.register(device_id)
    poll = LongPoll(pair.b, _head(pair.b))
    _waiting(pair.b)
    # The listener's connection dies; a revocation commits at once, while it reconnects.
    assert _terminate_listener(pair.database_url, "b") == 1
    committed = _decommission(pair.a, "dev-cut-1")
    poll.join(FEED_POLL_S)
    assert poll.returned_at is not None
    assert poll.returned_at - committed < 3.0, "the reconnect did not wake the long-poll"
    assert _events(poll) == ["dev-cut-1"]
    must_wait_for(
        lambda: pair.b.metric("certfleet_registry_feed_listener_connected") == 1,
        "the listener to be back",
    )
    assert pair.b.metric("certfleet_registry_feed_listener_reconnects_total") >= 1
    # Listening again: the next decommission wakes it within a second.
    poll = LongPoll(pair.b, _head(pair.b))
    _waiting(pair.b)
    committed = _decommission(pair.a, "dev-cut-2")
    poll.join(FEED_POLL_S)
    assert poll.returned_at is not None and poll.returned_at - committed < 1.0
    assert _events(poll) == ["dev-cut-2"]


def _crl(replica: Replica) -> tuple[int, int]:
    """(CRLNumber, number of entries) of the replica's current CRL."""
    response = replica.client.get("/crl.der")
    assert response.status_code == 200, response.text
    crl = x509.load_der_x509_crl(response.content)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return int(number), len(crl)


def test_crl_numbers_strictly_increase_across_replicas(pair: Pair) -> None:
    signed = []
    for index in range(6):
        device_id = f"dev-crl-{index}"
        pair.register(device_id)
        replica, other = (pair.a, pair.b) if index % 2 == 0 else (pair.b, pair.a)
        _decommission(replica, device_id)
        # Both replicas' CRLs are now older than the feed's head: each signs a new one.
        signed += [_crl(replica), _crl(other)]
    numbers = [number for number, _ in signed]
    assert numbers == sorted(set(numbers)), numbers  # strictly increasing, none repeated
    entries = [count for _, count in signed]
    assert entries == sorted(entries) and entries[-1] == 6, entries  # a higher number lists more


def _device(pair: Pair, device_id: str) -> tuple[MqttProbe, str]:
    directory = pair.register(device_id)
    files = ClientFiles(
        directory / "device.crt", directory / "device.key", directory / "root.crt", 0
    )
    assert pair.broker is not None
    probe = connect(pair.broker.port, files, device_id)
    assert probe.connected.is_set(), probe.reason
    issued = f"devices/{device_id}/cert/issued"
    probe.subscribed.clear()
    probe.client.subscribe(issued, qos=1)
    assert probe.subscribed.wait(10)
    return probe, issued


def _csr(pair: Pair, device_id: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    from fleetcore.keys import build_csr, generate_key
    from fleetcore.profile import Identity

    identity = Identity.device(pair.pki.ca.trust_domain, device_id)
    return build_csr(generate_key(), identity).public_bytes(serialization.Encoding.PEM)


def _answers(probe: MqttProbe, topic: str) -> list[bytes]:
    return [payload for received, payload in list(probe.messages) if received == topic]


def _renewal_outcomes(pair: Pair) -> str:
    return " | ".join(
        f"{replica.name}: "
        + ", ".join(
            line
            for line in replica.client.get("/metrics").text.splitlines()
            if line.startswith(
                ("certfleet_registry_renewals_total", "certfleet_registry_telemetry_messages")
            )
        )
        for replica in (pair.a, pair.b)
    )


def _claimed_elsewhere(pair: Pair) -> float:
    name = 'certfleet_registry_renewals_total{outcome="claimed_elsewhere"}'
    return pair.a.metric(name) + pair.b.metric(name)


def test_a_renewal_request_is_answered_once_by_two_replicas(pair_both_subscribed: Pair) -> None:
    pair = pair_both_subscribed
    probe, issued = _device(pair, "dev-renew-rep")
    csr = _csr(pair, "dev-renew-rep")
    try:
        probe.client.publish("devices/dev-renew-rep/cert/renew", csr, 1)
        must_wait_for(lambda: len(_answers(probe, issued)) >= 1, "the renewal answer")
        # Both replicas received it: the one that lost the claim counted it, and stayed silent.
        must_wait_for(
            lambda: _claimed_elsewhere(pair) == 1,
            f"the other replica to stand aside ({_renewal_outcomes(pair)})",
        )
        time.sleep(1.0)  # room for a second answer, were one coming
        [answer] = _answers(probe, issued)
        assert answer.startswith(b"-----BEGIN CERTIFICATE-----"), answer[:200]
        # The same request again (its answer was lost, say): answered once more, by the
        # replica holding the claim, with the same certificate.
        probe.client.publish("devices/dev-renew-rep/cert/renew", csr, 1)
        must_wait_for(
            lambda: _claimed_elsewhere(pair) == 2, "the other replica to stand aside again"
        )
        must_wait_for(lambda: len(_answers(probe, issued)) >= 2, "the second answer")
        time.sleep(1.0)
        assert _answers(probe, issued) == [answer, answer]
        # Client ids registry/a and registry/b: neither took the other's broker session over.
        for replica in (pair.a, pair.b):
            assert replica.metric("certfleet_registry_telemetry_connects_total") == 1
    finally:
        probe.close()


def test_the_renewal_rate_limit_counts_each_request_once_across_replicas(
    pair_both_subscribed: Pair,
) -> None:
    pair = pair_both_subscribed
    probe, issued = _device(pair, "dev-limit-rep")
    try:
        for attempt in range(MAX_ATTEMPTS + 1):
            payload = f"not a CSR, attempt {attempt}".encode()
            probe.client.publish("devices/dev-limit-rep/cert/renew", payload, 1)
            must_wait_for(lambda: len(_answers(probe, issued)) > attempt, "an answer")  # noqa: B023
        must_wait_for(lambda: _claimed_elsewhere(pair) == MAX_ATTEMPTS + 1, "both replicas' view")
        time.sleep(1.0)
        answers = _answers(probe, issued)
        errors = [json.loads(answer)["error"] for answer in answers]
        assert errors == ["invalid_csr"] * MAX_ATTEMPTS + ["rate_limited"], errors
    finally:
        probe.close()


def _issued_total(pair: Pair) -> float:
    name = 'certfleet_registry_renewals_total{outcome="issued"}'
    return pair.a.metric(name) + pair.b.metric(name)


def test_through_the_shared_group_a_renewal_request_reaches_one_replica(
    pair_with_broker: Pair,
) -> None:
    """The default: one delivery per request across the replicas (no claim race at all), and
    the same request again is still answered with the same certificate by whichever gets it."""
    pair = pair_with_broker
    probe, issued = _device(pair, "dev-renew-shared")
    csr = _csr(pair, "dev-renew-shared")
    try:
        probe.client.publish("devices/dev-renew-shared/cert/renew", csr, 1)
        must_wait_for(lambda: len(_answers(probe, issued)) >= 1, "the renewal answer")
        time.sleep(1.0)  # room for a second answer or a claim race, were one coming
        [answer] = _answers(probe, issued)
        assert answer.startswith(b"-----BEGIN CERTIFICATE-----"), answer[:200]
        assert _issued_total(pair) == 1, _renewal_outcomes(pair)
        assert _claimed_elsewhere(pair) == 0, _renewal_outcomes(pair)
        probe.client.publish("devices/dev-renew-shared/cert/renew", csr, 1)
        must_wait_for(lambda: len(_answers(probe, issued)) >= 2, "the second answer")
        time.sleep(1.0)
        assert _answers(probe, issued) == [answer, answer]
        assert _claimed_elsewhere(pair) == 0, _renewal_outcomes(pair)
    finally:
        probe.close()


def test_through_the_shared_group_the_rate_limit_holds_across_replicas(
    pair_with_broker: Pair,
) -> None:
    """Requests spread over the replicas by the group still count against one limit."""
    pair = pair_with_broker
    probe, issued = _device(pair, "dev-limit-shared")
    try:
        for attempt in range(MAX_ATTEMPTS + 1):
            payload = f"not a CSR, attempt {attempt}".encode()
            probe.client.publish("devices/dev-limit-shared/cert/renew", payload, 1)
            must_wait_for(lambda: len(_answers(probe, issued)) > attempt, "an answer")  # noqa: B023
        time.sleep(1.0)
        errors = [json.loads(answer)["error"] for answer in _answers(probe, issued)]
        assert errors == ["invalid_csr"] * MAX_ATTEMPTS + ["rate_limited"], errors
        assert _claimed_elsewhere(pair) == 0, _renewal_outcomes(pair)
    finally:
        probe.close()
