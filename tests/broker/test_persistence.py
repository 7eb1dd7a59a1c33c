"""The broker state file: format, validation, atomic 0600 writes, failures, and the
amqtt round trip (persistent_state -> file -> restore_state) on a real broker."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from pathlib import Path

import pytest

from broker.acl import TopicAcl
from broker.amqtt_adapter import CertfleetBroker
from broker.auth import AdmissionPolicy
from broker.gate import ConnectGate
from broker.metrics import BrokerMetrics
from broker.persistence import StateFile, StateFileError, decode_state, encode_state
from broker.server import BrokerServer
from broker.state import BrokerState, SessionState, StoredMessage
from fleetcore.profile import IdentityKind
from tests.support.mqtt import connect
from tests.support.pki import TRUST_DOMAIN, TestPKI, issue_device
from tests.support.servers import broker_data_dir, broker_settings
from tests.support.waits import wait_for

STATE = BrokerState(  # sorted by key, as persistent_state() gives it
    sessions=(
        SessionState("dev-1", (("devices/dev-1/#", 2),), (), disconnected_at=1_700_000_100.0),
        SessionState(
            key="service:registry",
            subscriptions=(("devices/+/telemetry", 1),),
            queued=(StoredMessage("devices/d/telemetry", b"\x00\xffbinary", 1),),
            disconnected_at=1_700_000_000.0,
        ),
    ),
    retained=(StoredMessage("devices/d/telemetry", b"kept", 0),),
)


def test_a_state_survives_encoding_and_decoding() -> None:
    assert decode_state(encode_state(STATE, "broker")) == STATE


def _body(**changes: object) -> bytes:
    body = json.loads(encode_state(STATE, "broker"))
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "top level"),
        (_body(format="mosquitto"), "format"),
        (_body(version=2), "format version 2; this certfleet reads version 1"),
        (_body(extra=1), "extra"),
        (_body(retained=[{"topic": "t", "qos": 3, "payload": ""}]), "retained.0.qos"),
        (_body(retained=[{"topic": "", "qos": 0, "payload": ""}]), "retained.0.topic"),
        (_body(retained=[{"topic": "t", "qos": 0, "payload": "***"}]), "not base64"),
        (_body(sessions=[{"key": "k", "subscriptions": [], "queued": []}]), "disconnected_at"),
    ],
)
def test_an_unusable_state_is_refused_saying_why(data: bytes, match: str) -> None:
    with pytest.raises(StateFileError, match=match):
        decode_state(data)


def test_the_file_is_written_0600_atomically_and_not_rewritten_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "broker" / "state-a.json"
    store = StateFile(path, node="a")
    assert asyncio.run(store.save(STATE))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state-a.json"]  # no temporary left
    assert json.loads(path.read_bytes())["node"] == "a"
    first = path.stat().st_mtime_ns
    assert asyncio.run(store.save(STATE))
    assert path.stat().st_mtime_ns == first
    assert StateFile(path, node="a").load() == STATE


def test_a_failed_write_is_reported_and_the_next_one_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "broker"
    blocker.write_text("a file where the folder should be")
    outcomes: list[bool] = []
    store = StateFile(
        blocker / "state-a.json", node="a", on_write=lambda ok, _s: outcomes.append(ok)
    )
    assert not asyncio.run(store.save(STATE))
    assert store.problems() and "not persisted" in store.problems()[0]
    blocker.unlink()
    assert asyncio.run(store.save(STATE))
    assert store.problems() == [] and outcomes == [False, True]


def test_a_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "none.json", node="a").load() == BrokerState()


def test_an_unusable_file_is_moved_aside_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "state-a.json"
    path.write_bytes(b"garbage")
    failures: list[int] = []
    store = StateFile(path, node="a", on_load_failure=lambda: failures.append(1))
    assert store.load() == BrokerState()
    assert failures == [1] and not path.exists()
    assert store.moved_aside is not None and store.moved_aside.read_bytes() == b"garbage"


class _NothingRevoked:
    def is_serial_revoked(self, serial: str) -> bool:
        return False

    def is_device_decommissioned(self, device_id: str) -> bool:
        return False


def test_restore_state_recreates_sessions_with_their_queue_and_subscriptions() -> None:
    async def round_trip() -> tuple[BrokerState, int]:
        gate = ConnectGate(AdmissionPolicy(TRUST_DOMAIN, _NothingRevoked()), BrokerMetrics())
        broker = CertfleetBroker(gate=gate, acl=TopicAcl(TRUST_DOMAIN))
        await broker.start()
        try:
            restored = await broker.restore_state(STATE)
            return broker.persistent_state(), restored
        finally:
            await broker.shutdown()

    state, restored = asyncio.run(round_trip())
    assert restored == 2
    assert state == STATE


def test_restore_state_keeps_no_subscription_the_acl_refuses() -> None:
    foreign = BrokerState(sessions=(SessionState("dev-1", (("devices/dev-2/#", 1),), (), 1.0),))

    async def restore() -> BrokerState:
        gate = ConnectGate(AdmissionPolicy(TRUST_DOMAIN, _NothingRevoked()), BrokerMetrics())
        broker = CertfleetBroker(gate=gate, acl=TopicAcl(TRUST_DOMAIN))
        await broker.start()
        try:
            await broker.restore_state(foreign)
            return broker.persistent_state()
        finally:
            await broker.shutdown()

    assert asyncio.run(restore()).sessions[0].subscriptions == ()


def test_a_persistent_session_and_its_queue_survive_an_in_process_restart(
    pki: TestPKI, tmp_path: Path
) -> None:
    layout = broker_data_dir(pki, tmp_path / "data")
    settings = broker_settings(layout)
    files = pki.client(IdentityKind.SERVICE, "registry")
    with BrokerServer(settings) as broker:
        away = connect(broker.port, files, "registry", clean_session=False)
        away.client.subscribe("devices/+/telemetry", qos=1)
        assert away.subscribed.wait(5)
        away.close()
        device = connect(broker.port, issue_device(pki, tmp_path, "dev-ip"), "dev-ip")
        device.client.publish("devices/dev-ip/telemetry", b"1", qos=1).wait_for_publish(5)
        device.close()
    with BrokerServer(settings) as broker:
        back = connect(broker.port, files, "registry", clean_session=False)
        try:
            assert back.session_present
            assert wait_for(lambda: back.messages == [("devices/dev-ip/telemetry", b"1")])
        finally:
            back.close()


def test_payloads_are_stored_as_base64() -> None:
    body = json.loads(encode_state(STATE, "broker"))
    payload = body["sessions"][1]["queued"][0]["payload"]
    assert base64.b64decode(payload) == b"\x00\xffbinary"
