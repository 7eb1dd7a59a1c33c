"""Broker settings: ``CERTFLEET_*`` environment variables, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.auth import ClientIdMode
from fleetcore.address import AddressStr
from fleetcore.config import settings_from_env
from fleetcore.layout import DEFAULT_DATA_DIR, DataLayout
from fleetcore.profile import NAME_PATTERN

__all__ = ["BrokerSettings", "build_settings"]


class BrokerSettings(BaseSettings):
    """Everything `certfleet broker serve` and :class:`broker.server.BrokerServer` need."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    broker_addr: AddressStr = "127.0.0.1:8883"
    #: Base URL of the registry whose revocation feed the broker follows; None = no follower
    #: (the broker still enforces the revoked set persisted in <data>/broker/).
    registry_url: str | None = None
    #: /metrics, /healthz and /readyz on their own loopback port (documented default 9883,
    #: beside MQTT's 8883; port 0 = ephemeral, None = disabled).
    broker_metrics_addr: AddressStr | None = "127.0.0.1:9883"
    #: Name of the server certificate in <data>/tls/ and of the service client cert used
    #: to read the registry feed (<data>/clients/<name>.crt).
    broker_name: str = "broker"
    #: This broker node's name: its state files are <data>/broker/revoked-<node>.*, so
    #: several brokers can share one data folder.
    broker_node: str = Field(default="broker", pattern=NAME_PATTERN.pattern)
    #: A TLS client that has not completed its handshake by then is cut off.
    broker_handshake_timeout_s: float = Field(default=10.0, gt=0)
    #: A connection that sends no CONNECT within this time after the handshake is cut off.
    broker_connect_timeout_s: float = Field(default=10.0, gt=0)
    #: Largest MQTT packet accepted (bytes); larger ones close the connection.
    broker_max_packet_bytes: int = Field(default=256 * 1024, ge=1024)
    #: Run the broker's event loop on uvloop when it is installed (the `fast` extra).
    broker_uvloop: bool = True
    #: Long-poll wait sent to the registry feed (seconds).
    broker_feed_wait_s: int = Field(default=25, ge=0, le=60)
    #: Longest pause between retries when the registry cannot be reached.
    broker_feed_max_backoff_s: float = Field(default=10.0, gt=0)
    #: Check this often that the event at the broker's position is still the feed's (one
    #: small read; a different one, a restored registry database, starts a resync from 0).
    broker_feed_resync_s: float = Field(default=300.0, gt=0)
    #: The revoked set's journal is fsynced at most this long after an append (what a power
    #: loss can cost: events the follower then reads again from the registry).
    broker_journal_fsync_s: float = Field(default=1.0, gt=0, le=60)
    #: How often expired serials (not_after + clock skew passed) leave the revoked set.
    broker_prune_s: float = Field(default=60.0, gt=0, le=86400)
    #: strict: the client id must be the certificate's id (empty + clean session gets it);
    #: from-certificate: any client id is replaced by the certificate's id.
    broker_client_id: ClientIdMode = ClientIdMode.STRICT
    #: The only service identity that may publish renewal answers (devices/<id>/cert/issued)
    #: and read renewal requests; every other service reads telemetry only.
    broker_renewal_service: str = Field(default="registry", pattern=NAME_PATTERN.pattern)
    #: Listen with SO_REUSEPORT, so several broker processes (cluster nodes) on one machine
    #: share one port and the kernel spreads connections over them.
    broker_reuse_port: bool = False
    #: NATS server of the cluster (``nats://host:port``, ``tls://host:port`` for TLS);
    #: None = a single node, as before (docs/cluster.md).
    broker_cluster_url: str | None = None
    #: NATS user and password; or an NKey seed file (0600). Never logged.
    broker_cluster_user: str | None = None
    broker_cluster_password: SecretStr | None = None
    broker_cluster_nkey_seed_file: Path | None = None
    #: CA file that signed the NATS server's certificate (turns TLS on).
    broker_cluster_ca_file: Path | None = None
    #: Longest pause between reconnect attempts while NATS is unreachable.
    broker_cluster_max_backoff_s: float = Field(default=5.0, gt=0)
    #: A shared subscription's message goes to a member on the publisher's node when there
    #: is one (no NATS hop); off: to any node's member, through NATS (the benchmark's
    #: comparison; docs/cluster.md, "Shared subscriptions").
    broker_shared_prefer_local: bool = True
    #: NATS not answering a probe within this on an open connection is a stall: /healthz
    #: and /readyz 503, cluster_connected 0, until it answers again.
    broker_cluster_stall_s: float = Field(default=1.5, gt=0, le=60)

    #: How long a persistent session whose client is away is kept (its subscriptions and
    #: queued messages; amqtt's session expiry, and in a cluster the JetStream consumers'
    #: inactivity limit and the session records' TTL).
    broker_session_expiry_s: int = Field(default=3600, ge=5, le=30 * 86400)
    #: Keep persistent sessions and retained messages across restarts in
    #: <data>/broker/state-<node>.json (single node; a cluster keeps them in its own store).
    broker_persist: bool = True
    #: How often that file is rewritten when the state changed: what a SIGKILL can cost.
    broker_persist_interval_s: float = Field(default=1.0, gt=0, le=3600)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)


def build_settings(**overrides: Any) -> BrokerSettings:
    """Settings from the environment, with explicit (non-None) overrides from flags."""
    return settings_from_env(BrokerSettings, "broker", overrides)
