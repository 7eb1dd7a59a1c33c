"""The telemetry a simulated device publishes."""

from __future__ import annotations

import datetime as dt
import json
import random

from device_sim.telemetry import SensorModel


def test_reading_carries_id_sequence_timestamp_and_plausible_values() -> None:
    model = SensorModel("dev-000001", random.Random(1))
    readings = [json.loads(model.reading(seq)) for seq in range(1, 101)]
    assert [r["seq"] for r in readings] == list(range(1, 101))
    for reading in readings:
        assert reading["device_id"] == "dev-000001"
        assert dt.datetime.fromisoformat(reading["ts"]).tzinfo is not None
        assert -10 <= reading["temperature_c"] <= 45
        assert 0 <= reading["humidity_pct"] <= 100
        assert 3.0 <= reading["battery_v"] <= 4.2
    # Values wander slowly instead of jumping around.
    temperatures = [r["temperature_c"] for r in readings]
    assert max(abs(a - b) for a, b in zip(temperatures, temperatures[1:], strict=False)) < 1.0
