"""Faults in a cluster: a node SIGKILLed with QoS 1 in flight, NATS restarted under load.
Nothing acknowledged to a publisher is lost."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from broker.cluster.natsd import LocalNats
from certfleet.procs import ProcessGroup
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from fleetcore.topics import TELEMETRY_FILTER, telemetry_topic
from tests.cluster.conftest import StartNode
from tests.cluster.node_process import log_dir, port_of, start_node_process
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import ClientFiles, TestPKI, issue_device
from tests.support.waits import wait_for

# `alone`: a node SIGKILLed and NATS restarted under load (time bounds).
pytestmark = pytest.mark.alone


class Publisher:
    """A device publishing numbered QoS 1 messages; remembers which were acknowledged."""

    def __init__(self, files: ClientFiles, device_id: str) -> None:
        self.files, self.device_id = files, device_id
        self.acked: set[bytes] = set()
        self._in_flight: dict[int, bytes] = {}
        self._acked_early: set[int] = set()  # PUBACKs that came before publish() returned
        self._lock = threading.Lock()
        self.probe: MqttProbe | None = None

    def attach(self, port: int) -> None:
        probe = connect(port, self.files, self.device_id)
        assert probe.connected.is_set(), probe.reason

        def on_publish(_c: object, _u: object, mid: int, _rc: object, _p: object) -> None:
            with self._lock:
                payload = self._in_flight.pop(mid, None)
                if payload is None:
                    self._acked_early.add(mid)
                else:
                    self.acked.add(payload)

        probe.client.on_publish = on_publish
        self.probe = probe

    def publish(self, payload: bytes) -> None:
        assert self.probe is not None
        # Not under our lock: paho's network thread holds its own lock while it calls
        # on_publish, and publish() takes that one (the two orders would deadlock).
        info = self.probe.client.publish(telemetry_topic(self.device_id), payload, qos=1)
        with self._lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                self.acked.add(payload)
            else:
                self._in_flight[info.mid] = payload

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


def test_sigkill_of_a_node_with_qos1_in_flight_loses_no_acknowledged_message(
    pki: TestPKI, cluster_layout: DataLayout, nats_server: LocalNats, tmp_path: Path
) -> None:
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    with ProcessGroup(log_dir(tmp_path)) as group:
        node_a = start_node_process(group, cluster_layout, nats_server, "a")
        node_b = start_node_process(group, cluster_layout, nats_server, "b")
        subscriber = connect(port_of(node_a), monitor, "monitor", clean_session=False)
        assert subscriber.connected.is_set(), subscriber.reason
        subscriber.client.subscribe(TELEMETRY_FILTER, qos=1)
        assert subscriber.subscribed.wait(5)
        publisher = Publisher(issue_device(pki, tmp_path, "dev-kill"), "dev-kill")
        publisher.attach(port_of(node_a))
        try:
            for index in range(300):
                publisher.publish(f"k{index}".encode())
                if index == 150:
                    os.kill(node_a.pid, signal.SIGKILL)  # QoS 1 in flight
                time.sleep(0.002)
            node_a.popen.wait(10)
            publisher.close()
            publisher.attach(port_of(node_b))
            for index in range(300, 330):
                publisher.publish(f"k{index}".encode())
            assert wait_for(lambda: {f"k{i}".encode() for i in range(300, 330)} <= publisher.acked)
            subscriber.close()
            resumed = connect(port_of(node_b), monitor, "monitor", clean_session=False)
            assert resumed.connected.is_set(), resumed.reason
            try:
                received = lambda: {payload for _topic, payload in resumed.messages}  # noqa: E731
                assert wait_for(lambda: publisher.acked <= received() | _early(subscriber), 20)
            finally:
                resumed.close()
            assert len(publisher.acked) >= 30
        finally:
            publisher.close()


def _early(probe: MqttProbe) -> set[bytes]:
    return {payload for _topic, payload in probe.messages}


def test_nats_restarted_under_load_no_false_ack_and_recovery(
    pki: TestPKI, start_node: StartNode, nats_server: LocalNats, tmp_path: Path
) -> None:
    node_a, node_b = start_node("a"), start_node("b")
    monitor = pki.client(IdentityKind.SERVICE, "monitor")
    subscriber = connect(node_b.port, monitor, "monitor", clean_session=False)
    subscriber.client.subscribe(TELEMETRY_FILTER, qos=1)
    assert subscriber.subscribed.wait(5)
    publisher = Publisher(issue_device(pki, tmp_path, "dev-nr"), "dev-nr")
    publisher.attach(node_a.port)
    try:
        for index in range(50):
            publisher.publish(f"n{index}".encode())
        assert wait_for(lambda: len(publisher.acked) == 50)
        nats_server.stop()
        assert wait_for(lambda: node_a.app is not None and node_a.app.problems() != [], 10)
        acked_before = len(publisher.acked)
        for index in range(50, 80):
            publisher.publish(f"n{index}".encode())
        time.sleep(1.0)
        assert len(publisher.acked) == acked_before  # no PUBACK while nothing can be stored
        health = node_a.metrics_url
        assert health is not None
        try:
            urllib.request.urlopen(health.removesuffix("/metrics") + "/healthz", timeout=5)
            raise AssertionError("healthz was 200 with NATS down")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            assert b"not connected to NATS" in exc.read()
        nats_server.start()
        assert wait_for(lambda: len(publisher.acked) == 80, 20), len(publisher.acked)
        assert wait_for(lambda: node_a.app is not None and node_a.app.problems() == [], 10)
        received = lambda: {payload for _topic, payload in subscriber.messages}  # noqa: E731
        assert wait_for(lambda: publisher.acked <= received(), 20), sorted(
            publisher.acked - received()
        )[:5]
    finally:
        publisher.close()
        subscriber.close()
