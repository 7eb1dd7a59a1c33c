"""Registry settings: ``CERTFLEET_*`` environment variables, overridden by CLI flags."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetcore.address import AddressStr, parse_address
from fleetcore.config import passphrase_bytes, settings_from_env
from fleetcore.layout import DEFAULT_DATA_DIR, DataLayout

__all__ = ["RegistrySettings", "build_settings", "split_addr"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RegistrySettings(BaseSettings):
    """Everything the registry needs; build it with :func:`build_settings`, never at import."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    #: host:port to listen on; port 0 picks a free port.
    registry_addr: AddressStr = "127.0.0.1:8443"
    #: host:port of the plain-HTTP publication listener (CRL, OCSP); empty: not served.
    registry_publish_addr: AddressStr | None = None
    #: OCSP nextUpdate: how long a relying party may cache an answer (a revocation reaches
    #: a caching one at most this late).
    registry_ocsp_next_update_s: float = Field(default=3600.0, ge=60, le=7 * 86400)
    #: SQLAlchemy URL; empty means the SQLite file ``<data_dir>/registry.db``.
    registry_database_url: str | None = None
    #: passphrase of the issuing CA key (the registry signs CRLs with it).
    ca_passphrase: SecretStr | None = None
    #: file whose first line is that passphrase (``--passphrase-file``).
    ca_passphrase_file: Path | None = None
    #: name of the server certificate in ``<data_dir>/tls/<name>.crt|.key``.
    registry_tls_name: str = "registry"
    #: CRL nextUpdate; the CRL is also re-signed when half of it has passed.
    registry_crl_next_update_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    #: the base CRL is re-signed at least this often (changes in between go to the delta
    #: CRL); relying parties that cannot read deltas (Mosquitto, nginx) lag by at most this.
    registry_crl_base_interval_s: float = Field(default=900.0, gt=0, le=30 * 86400)
    #: delta CRL nextUpdate; it is re-signed with every change and at half of this.
    registry_crl_delta_next_update_s: float = Field(default=3600.0, gt=0, le=7 * 86400)
    #: a base CRL of fewer entries than this is re-signed with every change, not only on its
    #: schedule (0: never; docs/registry.md).
    registry_crl_per_change_entries: int = Field(default=5_000, ge=0, le=10_000_000)
    #: a delta CRL of more entries than this makes the base CRL due at once (a change's
    #: cost stays bounded between scheduled bases).
    registry_crl_delta_max_entries: int = Field(default=5_000, ge=1, le=10_000_000)
    #: upper bound on ``GET /revocations?wait=``; requests asking for more are clamped.
    registry_feed_max_wait: float = Field(default=60.0, ge=0, le=60)
    #: how often a long-poll re-reads the database, for revocations written by another process.
    registry_feed_poll_seconds: float = Field(default=1.0, gt=0, le=10)
    #: worker processes checking large registration batches (empty: one per CPU; 0 or 1:
    #: check in the serving process).
    registry_verify_processes: int | None = Field(default=None, ge=0, le=64)
    #: threads serving sync endpoints (anyio's limiter); the connection pool holds this many
    #: plus a reserve for background tasks and /healthz, so a request never waits for one.
    registry_worker_threads: int = Field(default=40, ge=4, le=512)
    #: how long a request waits for a pooled database connection before a 503 (pool exhausted).
    registry_db_pool_timeout_s: float = Field(default=0.5, gt=0, le=30)
    #: host:port of the MQTT broker to ingest telemetry from (empty: no ingest).
    telemetry_broker_addr: AddressStr | None = None
    #: MQTT client id of the registry's broker connection; empty: ``<service>/<instance>``,
    #: the service name of its certificate (``registry``) and this process's instance name,
    #: so that two registry processes never take each other's broker session over.
    registry_mqtt_client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9:._/-]{1,128}$")
    #: this registry process's name among replicas (empty: ``<hostname>-<pid>``).
    registry_instance: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    )
    #: subscribe through the broker's shared subscriptions (``$share/registry-telemetry/...``
    #: and ``$share/registry-renewal/...``): with several registry replicas each reading is
    #: ingested, and each renewal request answered, by one of them. Off: every replica gets
    #: every message (a broker without ``$share`` support).
    registry_mqtt_shared: bool = True
    #: how often the MQTT watchdog re-subscribes and checks the SUBACK.
    registry_mqtt_watchdog_s: float = Field(default=30.0, gt=0, le=3600)
    #: answer CSRs on ``devices/+/cert/renew`` (needs the telemetry ingest's broker connection).
    registry_renewal_enabled: bool = True
    #: at most one renewal per device per this many seconds (0: no limit).
    registry_renewal_min_interval_s: float = Field(default=300.0, ge=0, le=30 * 86400)
    #: renewal requests (bad CSRs included) per device per that interval before rate_limited.
    registry_renewal_max_attempts: int = Field(default=5, ge=1, le=1000)
    #: lifetime of a renewed certificate; empty: that of the device's current certificate.
    registry_renewal_lifetime_days: float | None = Field(default=None, gt=0, le=3650)
    #: stagger window of renewed certificates' expiry (each device's offset into it is
    #: stable); needs ``registry_renewal_lifetime_days`` (docs/lifecycle.md).
    registry_renewal_stagger_s: float = Field(default=0.0, ge=0, le=3650 * 86400)
    #: grace between a renewed device's confirm and the revocation (reason superseded) of
    #: its older certificates: in-flight sessions with the old certificate end cleanly.
    registry_supersede_grace_s: float = Field(default=3600.0, ge=0, le=30 * 86400)
    #: how often the supersede worker looks for due revocations recorded by another
    #: registry process (its own confirms wake it at once).
    registry_supersede_check_s: float = Field(default=30.0, gt=0, le=3600)
    #: how long the expiry gauges of /metrics are reused before the database is asked again.
    registry_expiry_metrics_cache_s: float = Field(default=15.0, ge=0, le=3600)
    #: how long a web console sign-in lasts (the cookie's and the stored session's expiry).
    console_session_hours: float = Field(default=8.0, gt=0, le=24 * 7)
    #: failed console sign-ins allowed per client address within the window, then 429.
    console_signin_max_failures: int = Field(default=5, ge=1, le=1000)
    #: the window over which failed console sign-ins are counted, in seconds.
    console_signin_window_s: float = Field(default=300.0, gt=0, le=86400)
    #: reverse proxies (addresses or networks, comma-separated) whose X-Forwarded-For is
    #: believed; empty (the default): none, the socket peer is the client.
    registry_trusted_proxies: str = ""
    #: the pre-enrollment webhook (http:// or https:// URL), asked before every EST first
    #: enrollment with a claim whether the device may enroll: allow, deny or pending (202
    #: with Retry-After); no answer within the timeout, or any other answer, refuses the
    #: enrollment (fails closed; docs/registry.md). Empty: the claim's allow-list decides.
    registry_est_webhook_url: str = Field(default="", pattern=r"^(https?://\S+)?$", max_length=2048)
    #: the webhook's whole time bound (connect, send, answer), in seconds.
    registry_est_webhook_timeout_s: float = Field(default=2.0, gt=0, le=60)
    #: Retry-After of a 202 when the webhook says "pending" without one of its own.
    registry_est_webhook_retry_after_s: int = Field(default=60, ge=1, le=86400)

    @property
    def trusted_proxies(self) -> tuple[IPNetwork, ...]:
        """``registry_trusted_proxies`` parsed (validated when the settings were made)."""
        return _proxy_networks(self.registry_trusted_proxies)

    @field_validator("registry_trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: str) -> str:
        _proxy_networks(value)
        return value

    @property
    def renewal_lifetime(self) -> dt.timedelta | None:
        """Lifetime of renewed and re-enrolled certificates (None: copy the device's)."""
        days = self.registry_renewal_lifetime_days
        return dt.timedelta(days=days) if days else None

    @property
    def renewal_stagger(self) -> dt.timedelta:
        """Stagger window of renewed and re-enrolled certificates' expiry."""
        return dt.timedelta(seconds=self.registry_renewal_stagger_s)

    @model_validator(mode="after")
    def _stagger_needs_a_fixed_lifetime(self) -> RegistrySettings:
        if self.registry_renewal_stagger_s and self.registry_renewal_lifetime_days is None:
            raise ValueError(
                "CERTFLEET_REGISTRY_RENEWAL_STAGGER_S needs CERTFLEET_REGISTRY_RENEWAL_"
                "LIFETIME_DAYS: on top of a copied validity length the offset would lengthen "
                "every renewal"
            )
        return self

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def database_url(self) -> str:
        if self.registry_database_url:
            return self.registry_database_url
        return f"sqlite:///{self.layout.registry_db.resolve()}"

    @property
    def instance_name(self) -> str:
        """This process's name among replicas: ``registry_instance``, or ``<hostname>-<pid>``
        (cut to a valid instance name; unique per process on a machine)."""
        if self.registry_instance:
            return self.registry_instance
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "host"
        return f"{host[:50]}-{os.getpid()}"

    @property
    def ca_passphrase_bytes(self) -> bytes | None:
        return passphrase_bytes(self.ca_passphrase, self.ca_passphrase_file)


def _proxy_networks(value: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in value.split(","):
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"CERTFLEET_REGISTRY_TRUSTED_PROXIES: {item.strip()!r} is not an IP address or "
                "network (like 10.0.0.5 or 10.0.0.0/24)"
            ) from None
    return tuple(networks)


def split_addr(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:8443"`` -> ``("127.0.0.1", 8443)`` (:func:`fleetcore.address.parse_address`)."""
    address = parse_address(addr)
    return address.host, address.port


def build_settings(**overrides: object) -> RegistrySettings:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) on top."""
    return settings_from_env(RegistrySettings, "registry", overrides)
