"""Settings of `certfleet demo` and `certfleet up`: ``CERTFLEET_*`` variables, then flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetcore.address import AddressStr
from fleetcore.config import passphrase_bytes, settings_from_env
from fleetcore.layout import DEFAULT_DATA_DIR
from fleetcore.profile import NAME_PATTERN

__all__ = ["OrchestrateSettings", "build_settings"]


class OrchestrateSettings(BaseSettings):
    """What demo and up read; every part's own settings still apply to its process."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    registry_addr: AddressStr = "127.0.0.1:8443"
    broker_addr: AddressStr = "127.0.0.1:8883"
    #: The broker node `up` starts (CERTFLEET_BROKER_NODE, as the broker reads it); its ready
    #: file is <data>/broker-<node>.ready.json.
    broker_node: str = Field(default="broker", pattern=NAME_PATTERN.pattern)
    #: Broker nodes `up` runs (``--brokers``); more than one share the broker port
    #: (SO_REUSEPORT) and form a cluster on NATS (docs/cluster.md).
    up_brokers: int = Field(default=1, ge=1, le=16)
    #: NATS server of that cluster (CERTFLEET_BROKER_CLUSTER_URL, as the broker reads it);
    #: None with several brokers = `up` runs a local nats-server in <data>/nats.
    broker_cluster_url: str | None = None
    trust_domain: str = "fleet.local"
    #: Passphrase of the CA keys (CERTFLEET_CA_PASSPHRASE), for `up` creating missing certs.
    ca_passphrase: SecretStr | None = None
    #: File whose first line is that passphrase (``--passphrase-file``).
    ca_passphrase_file: Path | None = None
    #: The demo's own folder (wiped on each run, only if a previous demo made it);
    #: default ``<data_dir>/demo``.
    demo_dir: Path | None = None
    demo_devices: int = Field(default=1000, ge=2, le=20_000)
    demo_rate: float = Field(default=1.0, gt=0, le=100)
    #: Seconds the fleet publishes before the decommission, and after it.
    demo_warmup_s: float = Field(default=5.0, ge=1)
    demo_observe_s: float = Field(default=5.0, ge=2)
    #: The drop must be seen within this many seconds of the decommission call returning.
    demo_drop_budget_s: float = Field(default=1.0, gt=0)
    demo_workers: int | None = Field(default=None, ge=0, le=64)
    #: `certfleet sim lifecycle`: fleet size, certificate lifetime, expiry staggers (one run
    #: each), length of each run; durations as 4m, 240s, 0.
    lifecycle_devices: int = Field(default=200, ge=1, le=20_000)
    lifecycle_lifetime: str = "4m"
    lifecycle_staggers: str = "0,2m"
    lifecycle_duration: str = "10m"
    #: Grace before a superseded certificate is revoked; default 5 % of the lifetime.
    lifecycle_grace: str | None = None
    lifecycle_rate: float = Field(default=0.1, gt=0, le=100)
    lifecycle_workers: int | None = Field(default=None, ge=0, le=64)

    @property
    def passphrase(self) -> bytes | None:
        return passphrase_bytes(self.ca_passphrase, self.ca_passphrase_file)

    @property
    def demo_folder(self) -> Path:
        return self.demo_dir if self.demo_dir is not None else self.data_dir / "demo"


def build_settings(**overrides: Any) -> OrchestrateSettings:
    """Settings from the environment; explicit (non-None) keyword overrides win."""
    return settings_from_env(OrchestrateSettings, "demo", overrides)
