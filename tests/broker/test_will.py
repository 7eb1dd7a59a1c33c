"""Will messages pass the same ACL as a PUBLISH: a will outside the client's own topics is
refused at CONNECT (CONNACK 0x05, counted as ``will_refused``), so it can never be published."""

from __future__ import annotations

from pathlib import Path

from broker.auth import Refusal
from broker.server import BrokerServer
from fleetcore.profile import IdentityKind
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for


def _watcher(pki: TestPKI, broker: BrokerServer) -> MqttProbe:
    """The registry's identity subscribed to every device's telemetry and renewal topics."""
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    assert service.connected.is_set(), service.reason
    service.client.subscribe([("devices/+/telemetry", 2), ("devices/+/cert/renew", 2)])
    assert service.subscribed.wait(5)
    return service


#: (topic, qos, retain) of wills a device "dev-w" must not be able to arm.
FORGED_WILLS = [
    ("devices/dev-victim/telemetry", 0, False),  # another device's telemetry
    ("devices/dev-victim/telemetry", 1, True),  # ... retained
    ("devices/dev-victim/telemetry", 2, False),  # ... QoS 2
    ("devices/+/telemetry", 1, False),  # wildcards are no topic
    ("devices/dev-w/#", 1, False),
    ("$SYS/broker/uptime", 1, False),
    ("devices/dev-w/cert/issued", 1, False),  # only the registry answers renewals
    ("devices/dev-w/cert/renew", 1, True),  # renewal requests are never retained
]


def test_will_outside_what_the_device_may_publish_is_refused(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    service = _watcher(pki, broker)
    files = issue_device(pki, tmp_path, "dev-w")
    before = broker.metrics.refusal_count(Refusal.WILL_REFUSED.value)
    try:
        for n, (topic, qos, retain) in enumerate(FORGED_WILLS, start=1):
            device = connect(broker.port, files, "dev-w", will=(topic, b"forged", qos, retain))
            case = f"will {topic!r} qos={qos} retain={retain}"
            assert not device.connected.is_set(), case
            assert device.reason == "Not authorized", (case, device.reason)
            assert broker.metrics.refusal_count(Refusal.WILL_REFUSED.value) == before + n, case
            device.drop()  # vanish without DISCONNECT: a will, had it been armed, would go out
        # The real device with a will on its own telemetry: admitted, and its will (sent
        # when it vanishes) is the only message the service ever gets.
        honest = connect(
            broker.port, files, "dev-w", will=("devices/dev-w/telemetry", b"bye", 1, False)
        )
        assert honest.connected.is_set(), honest.reason
        honest.drop()
        assert wait_for(lambda: len(service.messages) >= 1)
        assert service.messages == [("devices/dev-w/telemetry", b"bye")]
        assert broker.call(lambda: "devices/dev-victim/telemetry" not in _retained(broker))
    finally:
        service.close()


def _retained(broker: BrokerServer) -> dict[str, object]:
    assert broker.app is not None and broker.app.broker is not None
    return dict(broker.app.broker.retained_messages)


def test_service_will_follows_the_service_acl(pki: TestPKI, broker: BrokerServer) -> None:
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    before = broker.metrics.refusal_count(Refusal.WILL_REFUSED.value)
    for topic in ("devices/dev-1/cert/issued", "devices/dev-1/telemetry"):
        probe = connect(broker.port, monitor, "monitor", will=(topic, b"forged", 1, False))
        assert not probe.connected.is_set() and probe.reason == "Not authorized"
        probe.close()
    assert broker.metrics.refusal_count(Refusal.WILL_REFUSED.value) == before + 2
    registry = pki.client(IdentityKind.SERVICE, "registry")
    answer = connect(
        broker.port, registry, "registry", will=("devices/dev-1/cert/issued", b"x", 1, False)
    )
    assert answer.connected.is_set(), answer.reason
    answer.close()
