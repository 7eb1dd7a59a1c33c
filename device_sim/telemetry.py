"""Plausible sensor readings, encoded as the telemetry JSON the broker and registry expect."""

from __future__ import annotations

import json
import random

from fleetcore.clock import utcnow

__all__ = ["SensorModel"]


class SensorModel:
    """A slowly wandering temperature and humidity and a slowly draining battery."""

    def __init__(self, device_id: str, rng: random.Random) -> None:
        self.device_id = device_id
        self._rng = rng
        self.temperature_c = rng.uniform(18.0, 26.0)
        self.humidity_pct = rng.uniform(35.0, 60.0)
        self.battery_v = rng.uniform(3.7, 4.2)

    def reading(self, seq: int) -> bytes:
        """The next reading as JSON bytes: device_id, seq, ts (ISO 8601 UTC) and sensors."""
        rng = self._rng
        self.temperature_c = min(45.0, max(-10.0, self.temperature_c + rng.gauss(0.0, 0.05)))
        self.humidity_pct = min(100.0, max(0.0, self.humidity_pct + rng.gauss(0.0, 0.2)))
        self.battery_v = max(3.0, self.battery_v - rng.uniform(0.0, 0.0002))
        return json.dumps(
            {
                "device_id": self.device_id,
                "seq": seq,
                "ts": utcnow().isoformat(timespec="milliseconds"),
                "temperature_c": round(self.temperature_c, 2),
                "humidity_pct": round(self.humidity_pct, 1),
                "battery_v": round(self.battery_v, 3),
            },
            separators=(",", ":"),
        ).encode()
