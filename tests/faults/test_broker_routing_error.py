"""A fault while routing messages (here: the ACL raising for one subscriber) is logged and
counted per message, and routing goes on: it used to end the broker's broadcast loop, after
which no message reached anyone."""

from __future__ import annotations

from pathlib import Path

from broker.acl import TopicAcl
from broker.server import BrokerServer
from fleetcore.profile import Identity, IdentityKind
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.waits import wait_for


def test_a_message_whose_routing_raises_is_counted_and_routing_goes_on(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    app = broker.app
    assert app is not None and app.broker is not None
    acl = app.acl
    registry = connect(broker.port, pki.client(IdentityKind.SERVICE, "registry"), "registry")
    monitor = connect(broker.port, pki.client(IdentityKind.SERVICE, "monitor"), "monitor")
    device = connect(broker.port, issue_device(pki, tmp_path, "dev-x"), "dev-x")
    try:
        for probe in (registry, monitor):
            assert probe.connected.is_set()
            probe.client.subscribe("devices/+/telemetry", qos=1)
            assert probe.subscribed.wait(5)

        def failing(key: str) -> Identity | None:
            if key == "service:monitor":
                raise RuntimeError("injected fault")
            return TopicAcl.identity_of(acl, key)

        broker.call(lambda: setattr(acl, "identity_of", failing))

        async def burst() -> None:  # 50 queued before the routing loop runs again
            assert app.broker is not None
            for n in range(50):
                await app.broker.internal_message_broadcast(
                    "devices/dev-x/telemetry", str(n).encode(), 0
                )

        broker.run(burst())

        def errors() -> float:
            value = broker.metrics.registry.get_sample_value("certfleet_broker_route_errors_total")
            return value or 0.0

        assert wait_for(lambda: errors() == 50)

        def restore() -> None:
            del acl.identity_of  # the class's own lookup again

        broker.call(restore)
        device.client.publish("devices/dev-x/telemetry", b"after", qos=1).wait_for_publish(5)
        for probe in (registry, monitor):
            assert wait_for(lambda p=probe: ("devices/dev-x/telemetry", b"after") in p.messages)
    finally:
        for probe in (device, monitor, registry):
            probe.close()


class _BrokenRevocations:
    """A revocation view that fails (a fault injected into the CONNECT gate)."""

    def is_serial_revoked(self, serial: str) -> bool:
        raise RuntimeError("injected fault")

    def is_device_decommissioned(self, device_id: str) -> bool:
        raise RuntimeError("injected fault")


def test_an_unexpected_error_at_connect_closes_the_socket_and_is_counted(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    app = broker.app
    assert app is not None
    files = issue_device(pki, tmp_path, "dev-y")
    working = app.policy.revocations
    broker.call(lambda: setattr(app.policy, "revocations", _BrokenRevocations()))
    try:
        probe = connect(broker.port, files, "dev-y", timeout=5)
        assert probe.disconnected.is_set(), "the client was left hanging"
        assert not probe.connected.is_set()
        probe.close()
        assert wait_for(
            lambda: (
                broker.metrics.registry.get_sample_value("certfleet_broker_connection_errors_total")
                == 1
            )
        )
    finally:
        broker.call(lambda: setattr(app.policy, "revocations", working))
    again = connect(broker.port, files, "dev-y")
    assert again.connected.is_set(), again.reason
    again.close()
