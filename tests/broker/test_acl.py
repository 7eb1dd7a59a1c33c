"""Topic ACL: devices stay under devices/<own-id>/, services read telemetry."""

from __future__ import annotations

from pathlib import Path

import pytest
from amqtt.contexts import Action

from broker.acl import is_allowed
from broker.server import BrokerServer
from factory.profile import Identity, IdentityKind
from tests.broker.conftest import connect, issue_device, wait_for
from tests.conftest import TRUST_DOMAIN, TestPKI

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
