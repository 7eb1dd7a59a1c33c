"""Simulator settings: ``CERTFLEET_*`` environment variables, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from device_sim.autorenew import RenewalPolicy
from fleetcore.address import Address, AddressStr, parse_address
from fleetcore.config import settings_from_env
from fleetcore.errors import ConfigError
from fleetcore.layout import DEFAULT_DATA_DIR

__all__ = [
    "BrokerListStr",
    "SimSettings",
    "broker_list",
    "build_settings",
    "parse_addr",
    "renewal_policy",
]


def broker_list(text: str) -> list[Address]:
    """``host:port[,host:port...]`` -> the brokers a device fails over between, each checked
    like every address (:func:`fleetcore.address.parse_address`), with a real port."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(
            f"broker list {text!r} needs host:port entries separated by commas "
            "(e.g. 127.0.0.1:8883,127.0.0.1:8884)"
        )
    brokers = [Address(*parse_addr(item)) for item in items]
    if len(set(brokers)) != len(brokers):
        raise ConfigError(f"broker list {text!r} names a broker twice")
    return brokers


def _validated_list(text: str) -> str:
    try:
        return ",".join(str(address) for address in broker_list(text))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


#: A settings field holding a comma-separated broker list, validated when settings load.
BrokerListStr = Annotated[str, AfterValidator(_validated_list)]


class SimSettings(BaseSettings):
    """Everything `certfleet sim run` and :class:`device_sim.runner.SimRun` read."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    #: Where devices connect (CERTFLEET_BROKER_ADDR); else each bundle's device.json.
    broker_addr: AddressStr | None = None
    #: Brokers a device fails over between (CERTFLEET_SIM_BROKERS, ``--broker A,B``); wins
    #: over broker_addr.
    sim_brokers: BrokerListStr | None = None
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
    #: Renew automatically at this fraction of the certificate's lifetime (0 < f < 1).
    sim_renew: bool = True
    sim_renew_at: float = Field(default=2 / 3, gt=0, lt=1)
    #: Jitter around that point, as a fraction of the lifetime (uniform in +-jitter).
    sim_renew_jitter: float = Field(default=0.05, ge=0, lt=0.5)
    #: Seconds to wait for the registry's answer to a CSR or a confirm.
    sim_renew_timeout: float = Field(default=30.0, gt=0)
    sim_renew_backoff_base: float = Field(default=1.0, gt=0)
    sim_renew_backoff_cap: float = Field(default=60.0, gt=0)
    #: Confirms sent (with backoff) before the device stops asking for an acknowledgement.
    sim_confirm_attempts: int = Field(default=5, ge=1, le=100)
    #: Key algorithm of renewed keys (p256, p384, ed25519, rsa2048).
    sim_renew_key_algorithm: str = "p256"
    #: Append one JSON line per renewal event to this file.
    sim_renewal_log: Path | None = None
    #: The registry's HTTPS URL (CERTFLEET_REGISTRY_URL): its EST server for ``--enroll est``.
    registry_url: str | None = None
    #: EST enrollments in flight at once (``--enroll est``).
    sim_enroll_concurrency: int = Field(default=16, ge=1, le=1000)
    #: Hardware serials ``<prefix><index>`` when no serials file is given (``--enroll est``).
    sim_serial_prefix: str = Field(default="SN-", pattern=r"^[\x21-\x7e]{0,100}$")


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


def renewal_policy(settings: SimSettings) -> RenewalPolicy | None:
    """The devices' renewal policy from settings; None when renewal is off."""
    if not settings.sim_renew:
        return None
    if settings.sim_renew_backoff_cap < settings.sim_renew_backoff_base:
        raise ConfigError("CERTFLEET_SIM_RENEW_BACKOFF_CAP must not be below _BASE")
    try:
        return _policy(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _policy(settings: SimSettings) -> RenewalPolicy:
    return RenewalPolicy(
        at=settings.sim_renew_at,
        jitter=settings.sim_renew_jitter,
        timeout=settings.sim_renew_timeout,
        backoff_base=settings.sim_renew_backoff_base,
        backoff_cap=settings.sim_renew_backoff_cap,
        confirm_attempts=settings.sim_confirm_attempts,
        key_algorithm=settings.sim_renew_key_algorithm,
    )
