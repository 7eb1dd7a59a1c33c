"""Simulator settings: ``CERTFLEET_*`` environment variables, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetcore.address import AddressStr, parse_address
from fleetcore.config import settings_from_env
from fleetcore.errors import ConfigError
from fleetcore.layout import DEFAULT_DATA_DIR

__all__ = ["SimSettings", "build_settings", "parse_addr"]


class SimSettings(BaseSettings):
    """Everything `certfleet sim run` and :class:`device_sim.runner.SimRun` read."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    #: Where devices connect (CERTFLEET_BROKER_ADDR); else each bundle's device.json.
    broker_addr: AddressStr | None = None
    #: How many bundles to run (the first N by name); None = every bundle.
    sim_devices: int | None = Field(default=None, ge=1)
    sim_rate: float = Field(default=1.0, gt=0, le=1000)  # readings per second per device
    sim_duration: float = Field(default=30.0, gt=0)  # seconds
    sim_qos: int = Field(default=1, ge=0, le=1)
    #: Worker processes; 0 = run in this process (a thread), None = one per 2,500 devices.
    sim_workers: int | None = Field(default=None, ge=0, le=64)
    #: Connection attempts in flight at once per worker (TLS handshakes are CPU work on
    #: both ends; bounding them keeps the loop responsive and the broker standing).
    sim_connect_concurrency: int = Field(default=64, ge=1, le=10_000)
    sim_connect_timeout: float = Field(default=10.0, gt=0)
    sim_keepalive: int = Field(default=60, ge=5, le=3600)
    sim_backoff_base: float = Field(default=0.5, gt=0)
    sim_backoff_cap: float = Field(default=30.0, gt=0)
    #: Unacknowledged readings a device keeps for resending (the oldest drop beyond it).
    sim_window: int = Field(default=1000, ge=1)
    #: Use uvloop for the workers' event loops when it is installed.
    sim_uvloop: bool = True


def build_settings(**overrides: Any) -> SimSettings:
    """Settings from the environment; explicit (non-None) keyword overrides win."""
    return settings_from_env(SimSettings, "simulator", overrides)


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` -> (host, port) (:func:`fleetcore.address.parse_address`); a device
    connects, so port 0 (ephemeral, for listeners) is refused too."""
    address = parse_address(addr)
    if address.port == 0:
        raise ConfigError(f"broker address {addr!r} needs a real port, not 0")
    return address.host, address.port
