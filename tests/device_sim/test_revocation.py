"""Against our own broker: a device revoked while connected is dropped, refused on reconnect,
and stops for good; the rest of the fleet keeps publishing."""

from __future__ import annotations

import asyncio
import random

from broker.server import BrokerServer
from device_sim.bundle import DeviceBundle
from device_sim.device import DeviceConfig, DeviceEvent, DeviceState, SimDevice
from device_sim.stats import WorkerStats
from fleetcore.profile import serial_hex
from tests.support.pki import Fleet


def test_revoked_device_is_dropped_refused_and_stops_while_others_publish(
    fleet: Fleet, certfleet_broker: BrokerServer
) -> None:
    ids = [f"dev-{i:04d}" for i in range(10, 16)]
    victim = ids[0]
    config = DeviceConfig(
        "127.0.0.1", certfleet_broker.port, rate=10.0, backoff_base=0.05, backoff_cap=0.2
    )
    events: list[DeviceEvent] = []

    async def scenario() -> tuple[dict[str, SimDevice], WorkerStats, int]:
        loop = asyncio.get_running_loop()
        stats = WorkerStats(devices=len(ids))
        slots = asyncio.Semaphore(8)
        devices = {
            device_id: SimDevice(
                DeviceBundle.load(fleet.data_dir / "devices" / device_id),
                config,
                stats,
                connect_slots=slots,
                events=events.append,
                rng=random.Random(i),
            )
            for i, device_id in enumerate(ids)
        }
        stop_at = loop.time() + 4.0
        runs = [asyncio.ensure_future(d.run(stop_at=stop_at)) for d in devices.values()]
        for _ in range(200):
            if stats.connected == len(ids):
                break
            await asyncio.sleep(0.02)
        assert stats.connected == len(ids)
        dropped = await asyncio.to_thread(
            certfleet_broker.revoke, [serial_hex(fleet.serials[victim])], victim
        )
        acked_at_revocation = stats.acked
        await asyncio.wait_for(asyncio.gather(*runs), timeout=20)
        assert dropped == 1
        return devices, stats, acked_at_revocation

    devices, stats, acked_at_revocation = asyncio.run(scenario())
    victim_events = [e.kind for e in events if e.device_id == victim]
    assert victim_events[:2] == ["connected", "disconnected"]
    assert victim_events[-2:] == ["connect_failed", "stopped"]
    assert devices[victim].state is DeviceState.STOPPED
    assert devices[victim].stop_reason in {"connack_not_authorized", "certificate_revoked"}
    assert stats.stopped == 1
    for device_id in ids[1:]:
        assert devices[device_id].state is DeviceState.FINISHED
        assert devices[device_id].unacked == 0
    assert stats.acked > acked_at_revocation + 5 * 10 * 2  # the others kept publishing
