"""Persistent (clean session off) sessions: what was queued while the client was away is
delivered when it comes back, and only what its identity may receive."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for

COUNT = 20


def _service(pki: TestPKI, broker: BrokerServer, name: str = "registry") -> MqttProbe:
    probe = connect(broker.port, pki.client(IdentityKind.SERVICE, name), name, clean_session=False)
    assert probe.connected.is_set(), probe.reason
    return probe


@pytest.mark.parametrize("qos", [1, 2])
def test_offline_messages_of_a_persistent_session_are_all_delivered(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path, qos: int
) -> None:
    service = _service(pki, broker)
    service.client.subscribe("devices/+/telemetry", qos=qos)
    assert service.subscribed.wait(5)
    service.close()
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-p"), "dev-p")
    try:
        assert device.connected.is_set()
        for n in range(COUNT):
            info = device.client.publish("devices/dev-p/telemetry", str(n).encode(), qos=qos)
            info.wait_for_publish(5)
            assert info.is_published()
    finally:
        device.close()
    refusals = broker.metrics.acl_refusal_count("receive")
    back = _service(pki, broker)
    try:
        assert back.session_present
        assert wait_for(lambda: len(back.messages) >= COUNT), len(back.messages)
        assert sorted(int(p) for _, p in back.messages) == list(range(COUNT))
        # Queued messages are forwarded to an established subscription: not retained.
        assert not any(retain for *_, retain in back.received)
        assert broker.metrics.acl_refusal_count("receive") == refusals
    finally:
        back.close()


def test_retained_messages_reach_only_sessions_allowed_to_receive_them(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    """amqtt replays every retained message matching *any* subscription in the broker to a
    client that connects; our broker sends each client only what its identity may receive."""
    service = _service(pki, broker)
    service.client.subscribe("devices/+/telemetry", qos=1)
    assert service.subscribed.wait(5)
    owner = connect(broker.port, issue_device(pki, tmp_path, "dev-r1"), "dev-r1")
    try:
        assert owner.connected.is_set()
        owner.client.publish(
            "devices/dev-r1/telemetry", b"kept", qos=1, retain=True
        ).wait_for_publish(5)
        assert wait_for(lambda: len(service.messages) == 1)
    finally:
        owner.close()
    other = connect(broker.port, issue_device(pki, tmp_path, "dev-r2"), "dev-r2")
    late = _service(pki, broker, "monitor")
    try:
        assert other.connected.is_set()
        late.client.subscribe("devices/+/telemetry", qos=1)
        assert late.subscribed.wait(5)
        # The monitor's new subscription gets the retained message (it may read telemetry)...
        assert wait_for(lambda: len(late.messages) == 1)
        assert late.received == [("devices/dev-r1/telemetry", b"kept", 1, True)]
        # ...while the other device, subscribed to nothing, must never see it.
        other.client.subscribe("devices/dev-r2/#", qos=1)
        assert other.subscribed.wait(5)
        assert not wait_for(lambda: len(other.messages) > 0, timeout=1.0)
    finally:
        other.close()
        late.close()
        service.close()


def test_retained_renewal_requests_are_routed_but_never_stored(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    registry = _service(pki, broker)
    registry.client.subscribe("devices/+/cert/renew", qos=1)
    assert registry.subscribed.wait(5)
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-rr"), "dev-rr")
    before = broker.metrics.acl_refusal_count("retain")
    try:
        assert device.connected.is_set()
        topic = "devices/dev-rr/cert/renew"
        device.client.publish(topic, b"CSR", qos=1, retain=True).wait_for_publish(5)
        assert wait_for(lambda: registry.received == [(topic, b"CSR", 1, False)])
    finally:
        device.close()
        registry.close()
    assert broker.metrics.acl_refusal_count("retain") == before + 1
    # The registry subscribes again (restart): the CSR is not replayed.
    again = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    try:
        again.client.subscribe("devices/+/cert/renew", qos=1)
        assert again.subscribed.wait(5)
        assert not wait_for(lambda: len(again.messages) > 0, timeout=1.0)
    finally:
        again.close()


@pytest.mark.alone
def test_keepalive_is_enforced_on_a_persistent_session_that_came_back(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    """The connection that resumes an existing session gets the keep-alive watch too (it
    used to be matched by the *first* connection's TLS object, so it got none)."""
    watcher = _service(pki, broker)
    watcher.client.subscribe("devices/+/telemetry", qos=1)
    assert watcher.subscribed.wait(5)
    files = issue_device(pki, tmp_path, "dev-ka")
    first = connect(broker.port, files, "dev-ka", clean_session=False, keepalive=2)
    assert first.connected.is_set()
    first.close()
    back = connect(
        broker.port,
        files,
        "dev-ka",
        clean_session=False,
        keepalive=2,
        will=("devices/dev-ka/telemetry", b"gone", 1, False),
    )
    try:
        assert back.connected.is_set() and back.session_present
        back.freeze()
        # No packet for 1.5 x 2 s: dropped, and its will published.
        assert wait_for(lambda: ("devices/dev-ka/telemetry", b"gone") in watcher.messages, 10)
    finally:
        back.drop()
        watcher.close()
