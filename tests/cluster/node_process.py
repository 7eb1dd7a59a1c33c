"""Broker nodes as real `certfleet broker serve --cluster` processes (for kill tests)."""

from __future__ import annotations

from pathlib import Path

from broker.cluster.natsd import LocalNats
from certfleet.procs import ManagedProcess, ProcessGroup, certfleet_argv
from fleetcore.layout import DataLayout

__all__ = ["start_node_process"]


def start_node_process(
    group: ProcessGroup, layout: DataLayout, nats: LocalNats, node: str
) -> ManagedProcess:
    """Start node ``node`` on an ephemeral port; returns once it listens."""
    ready = layout.root / f"broker-{node}.ready.json"
    argv = certfleet_argv(
        "broker", "serve", "--data-dir", str(layout.root), "--addr", "127.0.0.1:0",
        "--cluster", nats.url, "--node", node, "--ready-file", str(ready),
    )  # fmt: skip
    env = {
        "CERTFLEET_BROKER_CLUSTER_USER": nats.credentials.user,
        "CERTFLEET_BROKER_CLUSTER_PASSWORD": nats.credentials.password,
        "CERTFLEET_BROKER_METRICS_ADDR": "127.0.0.1:0",
        "CERTFLEET_BROKER_CLUSTER_MAX_BACKOFF_S": "0.5",
    }
    return group.start(f"broker-{node}", argv, ready, env=env)


def port_of(process: ManagedProcess) -> int:
    return int(str(process.ready["addr"]).rsplit(":", 1)[1])


def metrics_url(process: ManagedProcess) -> str:
    return str(process.ready["metrics_url"])


def log_dir(root: Path) -> Path:
    return root / "logs"
