"""Factory settings: ``CERTFLEET_*`` environment variables, overridden by CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetcore.config import passphrase_bytes, settings_from_env
from fleetcore.layout import DEFAULT_DATA_DIR, DataLayout

__all__ = ["FactorySettings", "build_settings"]


class FactorySettings(BaseSettings):
    """Everything the CA and provisioning commands read from the environment."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    #: Passphrase of the CA keys (CERTFLEET_CA_PASSPHRASE); None = keys are not encrypted.
    ca_passphrase: SecretStr | None = None
    #: File whose first line is that passphrase (``--passphrase-file``), instead of the variable.
    ca_passphrase_file: Path | None = None
    trust_domain: str = "fleet.local"
    key_algorithm: str = "p256"
    #: http:// base URL certificates name for their CRL and OCSP (``ca init --publish-url``).
    ca_publish_url: str | None = None
    #: Broker address written into every device bundle (CERTFLEET_BROKER_ADDR).
    broker_addr: str = "127.0.0.1:8883"
    #: Registry to register provisioned devices with (CERTFLEET_REGISTRY_URL); None = none.
    registry_url: str | None = None
    #: Bearer token for the registry (CERTFLEET_REGISTRY_TOKEN); else a client certificate.
    registry_token: SecretStr | None = None
    #: Client certificate name under clients/ used for the registry when no token is set.
    factory_registry_client: str = "factory"
    #: Device certificate lifetime and the window their expiries are spread over.
    device_lifetime: str = "365d"
    device_stagger: str = "90d"
    #: Minting processes; 0 = one per CPU.
    factory_workers: int = Field(default=0, ge=0, le=256)
    #: Devices per unit of work handed to a minting process.
    factory_chunk_size: int = Field(default=250, ge=1, le=10_000)
    #: Manifest lines are fsync'd in groups at most this many seconds apart (0 = every chunk).
    factory_fsync_interval: float = Field(default=1.0, ge=0.0, le=60.0)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def passphrase(self) -> bytes | None:
        return passphrase_bytes(self.ca_passphrase, self.ca_passphrase_file)

    @property
    def worker_count(self) -> int:
        return self.factory_workers or os.cpu_count() or 1


def build_settings(**overrides: Any) -> FactorySettings:
    """Build settings from the environment; keyword overrides (CLI flags) win when not None."""
    return settings_from_env(FactorySettings, "factory", overrides)
