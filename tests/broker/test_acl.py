"""Topic ACL: devices stay under devices/<own-id>/, services read telemetry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from amqtt.contexts import Action

from broker.acl import RefusalLog, is_allowed
from broker.server import BrokerServer
from fleetcore.profile import Identity, IdentityKind
from tests.support.mqtt import connect
from tests.support.pki import TRUST_DOMAIN, TestPKI, issue_device
from tests.support.waits import wait_for

DEV1 = Identity(TRUST_DOMAIN, IdentityKind.DEVICE, "dev-1")
SERVICE = Identity(TRUST_DOMAIN, IdentityKind.SERVICE, "registry")


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        ("devices/dev-1/telemetry", Action.PUBLISH, True),
        ("devices/dev-1/cert/renew", Action.PUBLISH, True),
        ("devices/dev-1/#", Action.SUBSCRIBE, True),
        ("devices/dev-1/cert/issued", Action.SUBSCRIBE, True),
        ("devices/dev-1x/telemetry", Action.PUBLISH, False),
        ("devices/dev-1x/#", Action.SUBSCRIBE, False),
        ("devices/dev-/telemetry", Action.PUBLISH, False),
        ("devices/dev-2/telemetry", Action.PUBLISH, False),
        ("devices/dev-1", Action.PUBLISH, False),
        ("devices/dev-1/", Action.PUBLISH, False),
        ("devices/+/telemetry", Action.SUBSCRIBE, False),
        ("devices/#", Action.SUBSCRIBE, False),
        ("#", Action.SUBSCRIBE, False),
        ("+/dev-1/telemetry", Action.SUBSCRIBE, False),
        ("$SYS/#", Action.SUBSCRIBE, False),
        ("$SYS/broker/clients", Action.SUBSCRIBE, False),
        ("/devices/dev-1/telemetry", Action.PUBLISH, False),
        ("devices/dev-2/telemetry", Action.RECEIVE, False),
        ("devices/dev-1/cert/issued", Action.PUBLISH, False),  # only the registry answers
    ],
)
def test_device_acl(topic: str, action: Action, allowed: bool) -> None:
    assert is_allowed(DEV1, topic, action) is allowed


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        ("devices/+/telemetry", Action.SUBSCRIBE, True),
        ("devices/dev-7/telemetry", Action.SUBSCRIBE, True),
        ("devices/+/cert/renew", Action.SUBSCRIBE, True),
        ("devices/dev-7/telemetry", Action.RECEIVE, True),
        ("devices/dev-7/cert/issued", Action.PUBLISH, True),
        ("devices/+/cert/issued", Action.PUBLISH, False),
        ("devices/dev-7/telemetry", Action.PUBLISH, False),
        ("#", Action.SUBSCRIBE, False),
        ("devices/#", Action.SUBSCRIBE, False),
        ("$SYS/#", Action.SUBSCRIBE, False),
        ("devices/+/+", Action.SUBSCRIBE, False),
    ],
)
def test_service_acl(topic: str, action: Action, allowed: bool) -> None:
    assert is_allowed(SERVICE, topic, action) is allowed


MONITOR = Identity(TRUST_DOMAIN, IdentityKind.SERVICE, "monitor")


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        ("devices/+/telemetry", Action.SUBSCRIBE, True),
        ("devices/dev-7/telemetry", Action.SUBSCRIBE, True),
        ("devices/dev-7/telemetry", Action.RECEIVE, True),
        ("devices/dev-7/cert/issued", Action.PUBLISH, False),
        ("devices/+/cert/renew", Action.SUBSCRIBE, False),
        ("devices/dev-7/cert/renew", Action.SUBSCRIBE, False),
        ("devices/dev-7/cert/renew", Action.RECEIVE, False),
        ("devices/+/cert/issued", Action.SUBSCRIBE, False),
        ("devices/dev-7/telemetry", Action.PUBLISH, False),
    ],
)
def test_other_services_only_read_telemetry(topic: str, action: Action, allowed: bool) -> None:
    assert is_allowed(MONITOR, topic, action) is allowed


def test_the_renewal_service_is_a_setting() -> None:
    topic = "devices/dev-7/cert/issued"
    assert is_allowed(MONITOR, topic, Action.PUBLISH, renewal_service="monitor")
    assert not is_allowed(SERVICE, topic, Action.PUBLISH, renewal_service="monitor")


def test_forged_renewal_answer_never_reaches_the_device(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    monitor = connect(broker.port, pki.client(IdentityKind.SERVICE, "monitor"), "monitor")
    registry = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    try:
        assert device.connected.is_set() and monitor.connected.is_set()
        assert registry.connected.is_set()
        device.client.subscribe("devices/dev-1/cert/issued", qos=1)
        assert device.subscribed.wait(5)
        monitor.client.subscribe("devices/+/cert/renew", qos=1)
        assert monitor.subscribed.wait(5)
        assert monitor.suback == [0x80]
        before = broker.metrics.acl_refusal_count("publish")
        issued = "devices/dev-1/cert/issued"
        monitor.client.publish(issued, b"forged refusal", qos=1).wait_for_publish(5)
        device.client.publish(issued, b"self-issued", qos=1).wait_for_publish(5)
        registry.client.publish(issued, b"real answer", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(device.messages) >= 1)
        assert device.messages == [(issued, b"real answer")]
        assert wait_for(lambda: broker.metrics.acl_refusal_count("publish") == before + 2)
    finally:
        for probe in (device, monitor, registry):
            probe.close()


def test_operator_has_no_topic_rights() -> None:
    operator = Identity(TRUST_DOMAIN, IdentityKind.OPERATOR, "alice")
    assert not is_allowed(operator, "devices/+/telemetry", Action.SUBSCRIBE)


def test_publish_outside_own_topics_never_reaches_subscriber(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        assert service.connected.is_set() and device.connected.is_set()
        service.client.subscribe("devices/+/telemetry", qos=1)
        assert service.subscribed.wait(5)
        before = broker.metrics.acl_refusal_count("publish")
        for topic in ("devices/dev-2/telemetry", "devices/dev-1x/telemetry"):
            device.client.publish(topic, b"spoofed", qos=1).wait_for_publish(5)
        # A permitted publish afterwards proves the refused ones were processed (in order).
        device.client.publish("devices/dev-1/telemetry", b"mine", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(service.messages) >= 1)
        assert service.messages == [("devices/dev-1/telemetry", b"mine")]
        assert wait_for(lambda: broker.metrics.acl_refusal_count("publish") == before + 2)
    finally:
        device.close()
        service.close()


def test_device_wildcard_and_foreign_subscriptions_are_refused(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        assert device.connected.is_set()
        tricks = ["#", "+/+/telemetry", "$SYS/#", "devices/+/telemetry", "devices/dev-1x/#"]
        before = broker.metrics.acl_refusal_count("subscribe")
        device.client.subscribe([(topic, 1) for topic in tricks] + [("devices/dev-1/#", 1)])
        assert device.subscribed.wait(5)
        assert device.suback == [0x80] * len(tricks) + [1]
        assert wait_for(
            lambda: broker.metrics.acl_refusal_count("subscribe") == before + len(tricks)
        )
    finally:
        device.close()


def test_service_cannot_subscribe_to_everything(pki: TestPKI, broker: BrokerServer) -> None:
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "monitor"), "monitor")
    try:
        assert service.connected.is_set()
        service.client.subscribe([("#", 1), ("$SYS/#", 1)])
        assert service.subscribed.wait(5)
        assert service.suback == [0x80, 0x80]
    finally:
        service.close()


def test_refused_topics_are_logged_once_per_interval_and_all_counted(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-1"), "dev-1")
    try:
        assert device.connected.is_set()
        before = broker.metrics.acl_refusal_count("publish")
        with caplog.at_level(logging.WARNING, logger="broker.acl"):
            for _ in range(30):
                device.client.publish("devices/dev-2/telemetry", b"x", qos=1).wait_for_publish(5)
            assert wait_for(lambda: broker.metrics.acl_refusal_count("publish") == before + 30)
        lines = [r.getMessage() for r in caplog.records if r.name == "broker.acl"]
        assert len(lines) == 1, lines
        assert "client_id=dev-1" in lines[0] and "devices/dev-2/telemetry" in lines[0]
    finally:
        device.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusal_log_reports_what_it_left_out_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    refusals = RefusalLog(10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="broker.acl"):
        for _ in range(5):
            refusals.refused("dev-1", Action.PUBLISH, "devices/dev-2/x")
        refusals.refused("dev-3", Action.SUBSCRIBE, "#")  # another client: its own line
        clock.now += 10.0
        refusals.refused("dev-1", Action.PUBLISH, "devices/dev-2/x")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "client_id=dev-1" in lines[0] and "refusals_not_logged=0" in lines[0]
    assert "client_id=dev-3" in lines[1]
    assert "client_id=dev-1" in lines[2] and "refusals_not_logged=4" in lines[2]


def test_refusal_log_memory_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    refusals = RefusalLog(10.0, max_clients=100, clock=clock)
    with caplog.at_level(logging.WARNING, logger="broker.acl"):
        for index in range(1000):
            clock.now += 0.001  # all within one interval: nothing is stale
            refusals.refused(f"dev-{index}", Action.PUBLISH, "#")
    assert len(refusals._last) <= 100
    assert len(caplog.records) == 1000  # every new client still gets its first line
