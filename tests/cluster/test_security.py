"""The cluster's NATS is for broker nodes only: loopback, authenticated; devices never
reach it, and a node without the credentials is refused and says so."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import nats
import nkeys
import pytest

from broker.cluster.link import ClusterError, ClusterOptions
from broker.cluster.natsd import LocalNats, find_nats_server
from broker.server import BrokerServer
from fleetcore.errors import ConfigError
from fleetcore.layout import DataLayout
from tests.cluster.conftest import node_settings
from tests.support.waits import wait_for


def test_nats_refuses_a_client_without_credentials(nats_server: LocalNats) -> None:
    async def attempt() -> None:
        client = await nats.connect(nats_server.url, allow_reconnect=False, connect_timeout=2)
        await client.close()

    with pytest.raises(nats.errors.Error, match="(?i)authorization"):
        asyncio.run(attempt())


def test_nats_listens_on_loopback_only(nats_server: LocalNats) -> None:
    config = (nats_server.folder / "nats-server.conf").read_text()
    assert f"listen: 127.0.0.1:{nats_server.port}" in config or "listen: 127.0.0.1:-1" in config
    for secret_file in ("nats-server.conf", "nats-credentials.json"):
        assert (nats_server.folder / secret_file).stat().st_mode & 0o077 == 0


def test_node_with_a_wrong_password_is_not_ready_and_says_why(
    cluster_layout: DataLayout, nats_server: LocalNats
) -> None:
    settings = node_settings(cluster_layout, nats_server, "a", broker_cluster_password="wrong")
    with BrokerServer(settings) as node:  # type: ignore[arg-type]
        assert node.metrics_url is not None
        base = node.metrics_url.removesuffix("/metrics")

        def health() -> tuple[int, dict[str, object]]:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        assert wait_for(lambda: "uthorization" in json.dumps(health()[1]), 10)
        status, body = health()
        assert status == 503
        assert "not connected to NATS" in json.dumps(body)
        assert "wrong" not in json.dumps(body)  # the password is never shown
        assert node.metrics.registry.get_sample_value("certfleet_broker_cluster_connected") == 0


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(ClusterError, match="holds credentials"):
        ClusterOptions(url="nats://u:secret@127.0.0.1:4222", node="a")
    with pytest.raises(ClusterError, match="is not nats://HOST:PORT"):
        ClusterOptions(url="http://127.0.0.1:4222", node="a")


def test_a_node_authenticates_with_an_nkey_seed_file(
    cluster_layout: DataLayout, tmp_path: Path
) -> None:
    if find_nats_server() is None:
        pytest.skip("nats-server not installed (apt install nats-server)")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "node.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    public = nkeys.from_seed(seed).public_key.decode()
    with LocalNats(tmp_path / "nats-nkey", nkey_user=public) as nats_nkey:
        settings = node_settings(
            cluster_layout,
            nats_nkey,
            "a",
            broker_cluster_user=None,
            broker_cluster_password=None,
            broker_cluster_nkey_seed_file=seed_file,
        )
        with BrokerServer(settings) as node:  # type: ignore[arg-type]
            app = node.app
            assert app is not None and app.cluster is not None
            assert wait_for(lambda: app.cluster is not None and app.cluster.link.connected, 10)
        seed_file.chmod(0o644)  # a seed others can read is refused at start
        with pytest.raises(ConfigError, match="readable by other users"):
            BrokerServer(settings).start()  # type: ignore[arg-type]
