"""A broker restart in the middle of a simulation: every device is back within a bounded
time and, at QoS 1, not one sequence number is lost (devices keep their unacknowledged
readings and resend them to the new broker, which knows nothing of the old sessions)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.server import BrokerServer
from device_sim.bundle import discover_bundles
from device_sim.device import DeviceConfig
from device_sim.runner import SimRun
from fleetcore.profile import IdentityKind
from tests.e2e.tcp_gate import TcpGate
from tests.support.pki import Fleet, TestPKI, write_device_bundle
from tests.support.servers import certfleet_broker_settings
from tests.support.waits import waited

# `alone`: every device back within a bounded time (time bounds).
pytestmark = pytest.mark.alone

DEVICES = 60
RATE = 5.0
BACKOFF_CAP = 2.0


@pytest.fixture(scope="module")
def restart_fleet(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    data_dir = tmp_path_factory.mktemp("restart-fleet")
    ids = [f"dev-r{i:03d}" for i in range(DEVICES)]
    return Fleet(data_dir, {d: write_device_bundle(pki.ca, data_dir, d) for d in ids})


class Subscriber:
    """The service identity subscribed to devices/+/telemetry at QoS 1, recording seqs."""

    def __init__(self, pki: TestPKI, port: int) -> None:
        files = pki.client(IdentityKind.SERVICE, "restart-monitor")
        context = ssl.create_default_context(cafile=str(files.root))
        context.load_cert_chain(str(files.cert), str(files.key))
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.received = 0
        self._closed = False
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="restart-monitor")
        self.client.tls_set_context(context)
        self.client.on_connect = lambda c, *_: c.subscribe("devices/+/telemetry", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscriber was not subscribed within 10 s"

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        reading = json.loads(message.payload)
        self.seen[reading["device_id"]].add(reading["seq"])
        self.received += 1

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        last, since = self.received, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if self.received != last:
                last, since = self.received, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.disconnect()
            self.client.loop_stop()


@pytest.fixture
def subscribers() -> Iterator[list[Subscriber]]:
    started: list[Subscriber] = []
    yield started
    for subscriber in started:
        subscriber.close()


def test_broker_restart_every_device_back_and_no_sequence_number_lost(
    pki: TestPKI, restart_fleet: Fleet, tmp_path: Path, subscribers: list[Subscriber]
) -> None:
    first = BrokerServer(certfleet_broker_settings(pki, tmp_path / "broker-a")).start()
    port = first.port
    second: BrokerServer | None = None
    try:
        subscribers.append(Subscriber(pki, port))
        bundles = discover_bundles(restart_fleet.data_dir)
        with TcpGate(port) as gate:
            config = DeviceConfig(
                "127.0.0.1",
                gate.port,
                rate=RATE,
                qos=1,
                backoff_base=0.2,
                backoff_cap=BACKOFF_CAP,
            )
            with SimRun(bundles, config, duration=10.0, workers=0, seed=3) as run:
                assert waited(lambda: run.snapshot().connected == DEVICES, 30) is not None
                time.sleep(1.5)  # publishing before the restart
                # The restart: every device link is cut, the broker goes away with every
                # session; a new broker comes up on the same port.
                gate.close()
                subscribers[0].wait_quiet()
                # Closed, not left to reconnect: a second client with the same client id
                # would take the new subscriber's session over (and back) on the new broker.
                subscribers[0].close()
                first.stop()
                acked_before_restart = run.snapshot().acked
                time.sleep(0.5)  # devices fail to reconnect meanwhile and keep readings
                second = BrokerServer(
                    certfleet_broker_settings(
                        pki, tmp_path / "broker-b", broker_addr=f"127.0.0.1:{port}"
                    )
                ).start()
                subscribers.append(Subscriber(pki, port))  # subscribed before devices return
                at_reopen = run.snapshot()
                gate.open()
                back_after = waited(lambda: run.snapshot().connected == DEVICES, 15)
                assert run.wait(40)
            summary = run.summary()
    finally:
        first.stop()
        if second is not None:
            second.stop()

    assert back_after is not None, "not every device reconnected within 15 s"
    assert back_after <= BACKOFF_CAP + 3.0, f"devices took {back_after:.1f}s to come back"
    assert summary["connects"] >= 2 * DEVICES
    assert summary["messages_acknowledged"] > acked_before_restart
    # Readings taken while the broker was away waited in the devices' windows...
    assert at_reopen.produced - at_reopen.acked >= DEVICES
    # ...and every reading was acknowledged in the end.
    assert summary["messages_acknowledged"] == summary["messages_produced"]
    assert summary["messages_retransmitted"] >= 0
    assert summary["messages_dropped_window_full"] == 0
    assert summary["stopped_by_reason"] == {}

    seen: dict[str, set[int]] = defaultdict(set)
    for subscriber in subscribers:
        for device_id, seqs in subscriber.seen.items():
            seen[device_id] |= seqs
    assert len(seen) == DEVICES
    produced = 0
    for device_id, seqs in seen.items():
        last = max(seqs)
        missing = set(range(1, last + 1)) - seqs
        first_seen = subscribers[0].seen.get(device_id, set())
        second_seen = subscribers[1].seen.get(device_id, set())
        assert not missing, (
            f"{device_id} lost seqs {sorted(missing)[:10]}; before the restart the subscriber "
            f"saw up to {max(first_seen, default=None)}, after it from "
            f"{min(second_seen, default=None)}"
        )
        produced += last
    assert produced == summary["messages_produced"]
