"""Shared subscriptions ($share/<group>/<filter>) on one node, real paho clients over mTLS."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from broker.server import BrokerServer
from broker.shared_subscriptions import SharedSubscriptionError, parse_share
from fleetcore.profile import IdentityKind
from tests.broker.conftest import MqttProbe, connect, issue_device, wait_for
from tests.conftest import TestPKI
from tests.support.mqtt import payloads, subscribed

TELEMETRY = "devices/+/telemetry"


def _member(
    broker: BrokerServer, pki: TestPKI, client_id: str, sub: str, **kw: object
) -> MqttProbe:
    probe = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), client_id, **kw)  # type: ignore[arg-type]
    return subscribed(probe, sub)


def _unacknowledged_go_to_b(a: MqttProbe, b: MqttProbe, device: MqttProbe) -> None:
    """``device`` publishes 20 readings to the group of ``a`` (which acknowledges nothing)
    and ``b``; ``a`` vanishes: what it held reaches ``b``, at once, each message once."""
    sent = [f"m{i}".encode() for i in range(20)]
    for payload in sent:
        device.client.publish("devices/dev-1/telemetry", payload, qos=1).wait_for_publish(5)
    assert wait_for(lambda: len(payloads(a, b)) >= len(sent), 3)
    held = set(payloads(a))
    assert held, "round robin gave the silent member nothing"
    assert not held & set(payloads(b))
    left_at = time.monotonic()
    a.drop()  # gone without acknowledging
    assert wait_for(lambda: held <= set(payloads(b)), 3), held - set(payloads(b))
    assert time.monotonic() - left_at < 3  # at the disconnect, not amqtt's 5 s timeout
    assert sorted(set(payloads(b))) == sorted(sent)  # nothing lost
    assert max(Counter(payloads(b)).values()) == 1


def test_parse_share_refuses_malformed_groups_and_filters() -> None:
    assert parse_share("devices/+/telemetry") is None
    share = parse_share("$share/ingest/devices/+/telemetry")
    assert share is not None and (share.group, share.topic_filter) == ("ingest", TELEMETRY)
    for bad in ("$share/", "$share/g", "$share/g/", "$share/g+/a", "$share/a#/b", "$share/g/a/#/b"):
        with pytest.raises(SharedSubscriptionError):
            parse_share(bad)


def test_each_message_goes_to_one_member_of_each_group(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    a = _member(broker, pki, "registry/a", f"$share/ingest/{TELEMETRY}")
    b = _member(broker, pki, "registry/b", f"$share/ingest/{TELEMETRY}")
    other = _member(broker, pki, "registry/c", f"$share/audit/{TELEMETRY}")
    plain = _member(broker, pki, "registry/d", TELEMETRY)
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        sent = [f"m{i}".encode() for i in range(60)]
        for payload in sent:
            device.client.publish("devices/dev-1/telemetry", payload, qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(plain.messages) == len(sent) and len(other.messages) == 60)
        assert wait_for(lambda: len(payloads(a, b)) >= len(sent))
        time.sleep(0.3)  # a duplicate would arrive by now
        assert sorted(payloads(a, b)) == sorted(sent)  # each once, across the group
        assert len(a.messages) >= 20 and len(b.messages) >= 20  # both members serve
        assert sorted(payloads(other)) == sorted(sent)  # another group: all of them
        assert [p for _t, p in plain.messages] == sent  # plain subscribers unchanged
    finally:
        for probe in (a, b, other, plain, device):
            probe.close()


def test_unacknowledged_messages_go_to_another_member_when_one_leaves(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    # "a" takes messages and never acknowledges them (paho's manual ack, never called).
    a = _member(broker, pki, "registry/a", f"$share/ingest/{TELEMETRY}", manual_ack=True)
    b = _member(broker, pki, "registry/b", f"$share/ingest/{TELEMETRY}")
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        _unacknowledged_go_to_b(a, b, device)
    finally:
        for probe in (b, device):
            probe.close()


def test_a_persistent_member_s_unacknowledged_messages_go_to_another_member_when_it_leaves(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    # "a" has a persistent session (clean session off): its group membership outlives the
    # connection, yet what it took and never acknowledged goes to "b" when it vanishes,
    # not into a's queue until it comes back.
    a = _member(
        broker,
        pki,
        "registry/a",
        f"$share/ingest/{TELEMETRY}",
        clean_session=False,
        manual_ack=True,
    )
    b = _member(broker, pki, "registry/b", f"$share/ingest/{TELEMETRY}")
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        _unacknowledged_go_to_b(a, b, device)
        # Still a member while away: its session keeps the group.
        assert broker.call(lambda: _members(broker)) == 2
    finally:
        for probe in (b, device):
            probe.close()


def test_the_acl_checks_the_filter_inside_share(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "monitor"), "monitor")
    try:
        cases = [
            (device, "$share/g/devices/dev-2/telemetry", 0x80),  # another device's topics
            (device, "$share/g/devices/+/telemetry", 0x80),
            (device, "$share/g/#", 0x80),
            (device, "$share/g/devices/dev-1/#", 1),  # its own
            (service, f"$share/g/{TELEMETRY}", 1),
            (service, "$share/g/devices/+/cert/renew", 0x80),  # not this service's
            (service, "$share/g", 0x80),
        ]
        for probe, topic_filter, code in cases:
            probe.subscribed.clear()
            probe.client.subscribe(topic_filter, qos=1)
            assert probe.subscribed.wait(5)
            assert probe.suback == [code], (topic_filter, probe.suback)
    finally:
        device.close()
        service.close()


def test_retained_messages_are_not_sent_to_a_shared_subscription(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    topic = "devices/dev-1/telemetry"
    device.client.publish(topic, b"retained", qos=1, retain=True).wait_for_publish(5)
    shared = _member(broker, pki, "registry/a", f"$share/g/{TELEMETRY}")
    plain = _member(broker, pki, "registry/b", TELEMETRY)
    try:
        assert wait_for(lambda: plain.messages == [(topic, b"retained")])
        device.client.publish(topic, b"live", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(shared.messages) == 1)
        time.sleep(0.3)
        assert shared.messages == [(topic, b"live")]
    finally:
        for probe in (device, shared, plain):
            probe.close()


def test_unsubscribe_leaves_the_group(pki: TestPKI, broker: BrokerServer, tmp_path: Path) -> None:
    a = _member(broker, pki, "registry/a", f"$share/g/{TELEMETRY}")
    b = _member(broker, pki, "registry/b", f"$share/g/{TELEMETRY}")
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        a.client.unsubscribe(f"$share/g/{TELEMETRY}")
        assert wait_for(lambda: broker.call(lambda: _members(broker)) == 1)
        sent = [f"m{i}".encode() for i in range(10)]
        for payload in sent:
            device.client.publish("devices/dev-1/telemetry", payload, qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(b.messages) == len(sent))
        assert a.messages == []
    finally:
        for probe in (a, b, device):
            probe.close()


def _members(broker: BrokerServer) -> int:
    assert broker.app is not None and broker.app.broker is not None
    return sum(len(g.members) for g in broker.app.broker.shared.groups.values())


def test_a_clean_session_leaves_its_groups_when_it_ends(pki: TestPKI, broker: BrokerServer) -> None:
    a = _member(broker, pki, "registry/a", f"$share/g/{TELEMETRY}")
    a.close()
    assert wait_for(lambda: broker.call(lambda: _members(broker)) == 0, 5)
    # The same client id connecting again with a clean session starts without the group.
    again = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry/a")
    try:
        assert again.connected.is_set()
        assert broker.call(lambda: _members(broker)) == 0
    finally:
        again.close()


def test_a_slow_member_gets_each_message_once_through_its_window(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    # The only member acknowledges one message every 20 ms: 300 messages take it 6 s, more
    # than amqtt's 5 s acknowledgement bound. Sent all at once (before the window), the last
    # ones missed that bound and were handed over, i.e. sent to it a second time; with a
    # window of 10 in flight the rest wait in the broker and each arrives exactly once.
    assert broker.app is not None and broker.app.broker is not None
    shared = broker.app.broker.shared
    handed_over = broker.app.metrics.shared_handed_over
    before = handed_over._value.get()
    window, shared.window = shared.window, 10
    slow = _member(broker, pki, "registry/slow", f"$share/ingest/{TELEMETRY}")
    record = slow.client.on_message

    def on_message(client: object, userdata: object, message: object) -> None:
        time.sleep(0.02)  # paho acknowledges when the callback returns
        record(client, userdata, message)  # type: ignore[misc]

    slow.client.on_message = on_message
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        sent = [f"m{i}".encode() for i in range(300)]
        infos = [device.client.publish("devices/dev-1/telemetry", p, qos=1) for p in sent]
        for info in infos:
            info.wait_for_publish(10)
        assert wait_for(lambda: len(slow.messages) >= len(sent), 20), len(slow.messages)
        time.sleep(0.3)  # a duplicate would arrive by now
        assert sorted(payloads(slow)) == sorted(sent)  # each exactly once
        assert handed_over._value.get() == before  # nothing timed out and went again
        assert broker.call(lambda: sum(len(g.backlog) for g in shared.groups.values())) == 0
    finally:
        shared.window = window
        for probe in (slow, device):
            probe.close()
