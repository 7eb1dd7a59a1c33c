"""`certfleet broker` commands."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["app", "raise_open_file_limit"]

app = typer.Typer(help="broker commands", no_args_is_help=True)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (10,000 devices need 10,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


@app.command("serve")
def serve_command(
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="CERTFLEET_DATA_DIR", help="certfleet data folder"),
    ] = None,
    addr: Annotated[
        str | None,
        typer.Option(
            "--addr",
            envvar="CERTFLEET_BROKER_ADDR",
            help="listen address host:port, port 0 = ephemeral [127.0.0.1:8883]",
        ),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(
            "--registry-url",
            envvar="CERTFLEET_REGISTRY_URL",
            help="registry base URL whose revocation feed the broker follows",
        ),
    ] = None,
    metrics_addr: Annotated[
        str | None,
        typer.Option(
            "--metrics-addr",
            help="/metrics, /healthz, /readyz host:port (CERTFLEET_BROKER_METRICS_ADDR) "
            "[127.0.0.1:9883]",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            envvar="CERTFLEET_BROKER_CLUSTER_URL",
            help="join the cluster on this NATS server (nats://HOST:PORT or tls://HOST:PORT); "
            "credentials from CERTFLEET_BROKER_CLUSTER_USER/_PASSWORD or "
            "CERTFLEET_BROKER_CLUSTER_NKEY_SEED_FILE",
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            envvar="CERTFLEET_BROKER_NODE",
            help="this node's name (its state files are named by it) [broker]",
        ),
    ] = None,
    reuse_port: Annotated[
        bool | None,
        typer.Option(
            "--reuse-port/--no-reuse-port",
            help="SO_REUSEPORT: nodes on one machine share one port (CERTFLEET_BROKER_REUSE_PORT)",
        ),
    ] = None,
    shared_prefer_local: Annotated[
        bool | None,
        typer.Option(
            "--shared-prefer-local/--no-shared-prefer-local",
            help="cluster: a shared group's member on the publisher's node first "
            "(CERTFLEET_BROKER_SHARED_PREFER_LOCAL) [on]",
        ),
    ] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option("--ready-file", help="write {addr, pid, metrics_url} JSON once listening"),
    ] = None,
) -> None:
    """Run the mTLS MQTT broker until interrupted (SIGINT/SIGTERM)."""
    from broker.server import serve
    from broker.settings import build_settings

    settings = build_settings(
        data_dir=data_dir,
        broker_addr=addr,
        registry_url=registry_url,
        broker_metrics_addr=metrics_addr,
        broker_cluster_url=cluster,
        broker_node=node,
        broker_reuse_port=reuse_port,
        broker_shared_prefer_local=shared_prefer_local,
    )
    raise_open_file_limit()
    runner = asyncio.Runner(loop_factory=_loop_factory(settings.broker_uvloop))
    with runner:
        runner.run(serve(settings, ready_file))


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None
