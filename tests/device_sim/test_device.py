"""SimDevice against a real broker (Mosquitto over mTLS): publishing, permanent refusals stop
the device, transient failures are retried."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from device_sim.bundle import DeviceBundle
from device_sim.credentials import Credentials
from device_sim.device import DeviceConfig, DeviceEvent, DeviceState, SimDevice
from device_sim.stats import WorkerStats
from tests.device_sim.conftest import MosquittoFactory
from tests.support.pki import Fleet
from tests.support.ports import free_port

pytestmark = pytest.mark.mosquitto


def _bundle(fleet: Fleet, device_id: str) -> DeviceBundle:
    return DeviceBundle.load(fleet.data_dir / "devices" / device_id)


async def _run(
    bundle: DeviceBundle,
    config: DeviceConfig,
    duration: float,
    events: list[DeviceEvent] | None = None,
) -> tuple[SimDevice, WorkerStats]:
    stats = WorkerStats(devices=1)
    device = SimDevice(
        bundle,
        config,
        stats,
        connect_slots=asyncio.Semaphore(4),
        events=events.append if events is not None else None,
        rng=random.Random(7),
    )
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(device.run(stop_at=loop.time() + duration), timeout=duration + 15)
    return device, stats


def test_device_publishes_and_every_reading_is_acknowledged(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    broker = mosquitto()
    config = DeviceConfig("127.0.0.1", broker.port, rate=20.0, qos=1)
    events: list[DeviceEvent] = []
    device, stats = asyncio.run(_run(_bundle(fleet, "dev-0000"), config, 1.5, events))
    assert device.state is DeviceState.FINISHED
    assert stats.produced >= 20
    assert stats.acked == stats.produced == stats.sent
    assert device.unacked == 0
    assert stats.connect_latency.count == 1
    assert stats.publish_latency.count == stats.acked
    assert [e.kind for e in events] == ["connected"]


def test_device_with_revoked_certificate_stops_for_good(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    broker = mosquitto(revoked=[fleet.serials["dev-0001"]])
    config = DeviceConfig("127.0.0.1", broker.port, rate=5.0, backoff_base=0.05)
    events: list[DeviceEvent] = []
    device, stats = asyncio.run(_run(_bundle(fleet, "dev-0001"), config, 5.0, events))
    assert device.state is DeviceState.STOPPED
    assert device.stop_reason == "certificate_revoked"
    assert stats.permanent == {"certificate_revoked": 1}
    assert stats.ever_connected == 0
    assert [e.kind for e in events] == ["connect_failed", "stopped"]


def test_device_with_foreign_certificate_stops_for_good(
    foreign_fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    broker = mosquitto()
    config = DeviceConfig("127.0.0.1", broker.port, backoff_base=0.05)
    device, stats = asyncio.run(_run(_bundle(foreign_fleet, "dev-foreign"), config, 5.0))
    assert device.state is DeviceState.STOPPED
    assert device.stop_reason in {"certificate_unknown_ca", "certificate_rejected"}
    assert stats.stopped == 1


def test_device_refused_by_connack_stops_for_good(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    # Without use_identity_as_username, Mosquitto answers CONNACK "not authorised".
    broker = mosquitto(require_certificate=False)
    config = DeviceConfig("127.0.0.1", broker.port, backoff_base=0.05)
    device, stats = asyncio.run(_run(_bundle(fleet, "dev-0002"), config, 5.0))
    assert device.state is DeviceState.STOPPED
    assert device.stop_reason == "connack_not_authorized"
    assert stats.failures == {"connack_not_authorized": 1}


def test_device_retries_while_broker_is_down_then_connects(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    port = free_port()
    config = DeviceConfig("127.0.0.1", port, rate=10.0, backoff_base=0.05, backoff_cap=0.2)

    async def scenario() -> tuple[SimDevice, WorkerStats]:
        run = asyncio.ensure_future(_run(_bundle(fleet, "dev-0003"), config, 3.0))
        await asyncio.sleep(0.6)  # let the device fail a few times against a closed port
        await asyncio.to_thread(mosquitto, port=port)
        return await run

    device, stats = asyncio.run(scenario())
    assert stats.failures["connection_refused"] >= 2
    assert stats.ever_connected == 1
    assert device.state is DeviceState.FINISHED
    assert stats.acked == stats.produced > 0


def test_unreadable_bundle_is_a_permanent_failure(fleet: Fleet, tmp_path: Path) -> None:
    bundle = _bundle(fleet, "dev-0004")
    broken = DeviceBundle(bundle.device_id, tmp_path / "missing.crt", bundle.key, bundle.root, None)
    config = DeviceConfig("127.0.0.1", free_port())
    device, stats = asyncio.run(_run(broken, config, 2.0))
    assert device.stop_reason == "bundle_unreadable"
    assert stats.permanent == {"bundle_unreadable": 1}


def test_device_at_qos0_counts_readings_written(fleet: Fleet, mosquitto: MosquittoFactory) -> None:
    broker = mosquitto()
    config = DeviceConfig("127.0.0.1", broker.port, rate=20.0, qos=0)
    device, stats = asyncio.run(_run(_bundle(fleet, "dev-0005"), config, 1.0))
    assert stats.produced >= 10
    assert stats.acked == stats.sent == stats.produced
    assert device.unacked == 0


def test_unacked_window_is_bounded_while_the_broker_is_gone(
    fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    broker = mosquitto()
    config = DeviceConfig(
        "127.0.0.1", broker.port, rate=40.0, window=5, backoff_base=0.05, backoff_cap=0.1
    )
    events: list[DeviceEvent] = []

    async def scenario() -> tuple[SimDevice, WorkerStats]:
        run = asyncio.ensure_future(_run(_bundle(fleet, "dev-0006"), config, 2.0, events))
        while not events:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(broker.stop)  # the broker goes away for the rest of the run
        return await run

    device, stats = asyncio.run(scenario())
    assert device.state is DeviceState.FINISHED  # a vanished broker is not a reason to give up
    assert stats.disconnects == {"connection_lost": 1}
    assert stats.failures["connection_refused"] >= 2
    assert device.unacked == 5
    assert stats.dropped_overflow == stats.produced - stats.acked - 5 > 0


def test_a_renewed_pair_that_cannot_connect_is_dropped_for_the_old_one(
    fleet: Fleet, foreign_fleet: Fleet, mosquitto: MosquittoFactory
) -> None:
    broker = mosquitto()
    config = DeviceConfig("127.0.0.1", broker.port, rate=20.0, renewal=None)
    foreign = _bundle(foreign_fleet, "dev-foreign")
    stats = WorkerStats(devices=1)

    async def scenario() -> tuple[SimDevice, bool]:
        device = SimDevice(
            _bundle(fleet, "dev-0007"), config, stats, connect_slots=asyncio.Semaphore(2)
        )
        loop = asyncio.get_running_loop()
        run = asyncio.ensure_future(device.run(stop_at=loop.time() + 3.0))
        assert await device.wait_connected(10)
        # A pair the broker refuses (another CA): the device must come back on its own pair.
        switched = await device.switch(Credentials(foreign.cert, foreign.key))
        await asyncio.wait_for(run, 20)
        return device, switched

    device, switched = asyncio.run(scenario())
    assert switched is False
    assert device.state is DeviceState.FINISHED
    assert stats.reconnects == 1 and stats.permanent == {}
    assert stats.acked == stats.produced > 40
