"""Devices and services never share an amqtt session, whatever their names."""

from __future__ import annotations

from pathlib import Path

from broker.server import BrokerServer
from broker.sessions import identity_of_key, session_key
from fleetcore.profile import Identity, IdentityKind
from tests.support.mqtt import connect
from tests.support.pki import TRUST_DOMAIN, TestPKI, issue_device
from tests.support.waits import wait_for


def test_keys_of_devices_and_services_cannot_collide() -> None:
    device = Identity(TRUST_DOMAIN, IdentityKind.DEVICE, "grafana")
    service = Identity(TRUST_DOMAIN, IdentityKind.SERVICE, "grafana")
    assert session_key(device) == "grafana"
    assert session_key(service) == "service:grafana"
    assert identity_of_key(session_key(device), TRUST_DOMAIN) == device
    assert identity_of_key(session_key(service), TRUST_DOMAIN) == service
    assert identity_of_key("service:", TRUST_DOMAIN) is None
    assert identity_of_key("a/b", TRUST_DOMAIN) is None
    assert session_key(service, "a") == "service:grafana/a"
    assert identity_of_key("service:grafana/a", TRUST_DOMAIN) == service
    assert identity_of_key("service:grafana/a b", TRUST_DOMAIN) is None


def test_a_device_named_like_a_service_leaves_the_service_session_alone(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    service = connect(broker.port, pki.client(IdentityKind.SERVICE, "grafana"), "grafana")
    sender = connect(broker.port, issue_device(pki, tmp_path, "dev-s"), "dev-s")
    try:
        assert service.connected.is_set() and sender.connected.is_set()
        service.client.subscribe("devices/+/telemetry", qos=1)
        assert service.subscribed.wait(5)
        # A device whose id is "grafana" (a service name, not reserved for devices)
        # connects with clean session, twice.
        for _ in range(2):
            twin = connect(broker.port, issue_device(pki, tmp_path, "grafana"), "grafana")
            assert twin.connected.is_set(), twin.reason
            twin.client.publish("devices/grafana/telemetry", b"twin", qos=1).wait_for_publish(5)
            twin.close()
        sender.client.publish("devices/dev-s/telemetry", b"after", qos=1).wait_for_publish(5)
        assert wait_for(lambda: ("devices/dev-s/telemetry", b"after") in service.messages)
        assert service.messages.count(("devices/grafana/telemetry", b"twin")) == 2
        assert service.client.is_connected()
    finally:
        sender.close()
        service.close()


def test_a_service_may_send_its_namespaced_key_as_client_id(
    pki: TestPKI, broker: BrokerServer
) -> None:
    probe = connect(broker.port, pki.client(IdentityKind.SERVICE, "monitor"), "service:monitor")
    assert probe.connected.is_set(), probe.reason
    probe.close()


def test_processes_of_one_service_keep_their_own_sessions(
    pki: TestPKI, broker: BrokerServer, tmp_path: Path
) -> None:
    """Two registry replicas (client ids ``registry/a``, ``registry/b``) both stay connected
    and both get telemetry; a second ``registry/a`` takes over only ``registry/a``."""
    files = pki.client(IdentityKind.SERVICE, "registry")
    replicas = [connect(broker.port, files, f"registry/{n}") for n in ("a", "b")]
    sender = connect(broker.port, issue_device(pki, tmp_path, "dev-i"), "dev-i")
    try:
        for replica in replicas:
            assert replica.connected.is_set(), replica.reason
            replica.client.subscribe("devices/+/telemetry", qos=1)
            assert replica.subscribed.wait(5)
        sender.client.publish("devices/dev-i/telemetry", b"1", qos=1).wait_for_publish(5)
        assert all(wait_for(lambda r=r: len(r.messages) == 1) for r in replicas)
        takeover = connect(broker.port, files, "registry/a")
        assert takeover.connected.is_set()
        assert wait_for(replicas[0].disconnected.is_set)
        assert not replicas[1].disconnected.is_set()
        takeover.close()
        bad = connect(broker.port, files, "registry/a b")
        assert not bad.connected.is_set() and bad.reason == "Not authorized"
        bad.close()
        device_instance = connect(broker.port, issue_device(pki, tmp_path, "dev-j"), "dev-j/x")
        assert not device_instance.connected.is_set()
        device_instance.close()
    finally:
        sender.close()
        for replica in replicas:
            replica.close()
