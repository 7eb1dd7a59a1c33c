"""Data folders and settings of the servers tests start in process (broker, registry)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.settings import RegistrySettings
from tests.support.pki import ClientFiles, TestPKI
from tests.support.tls import tls_context
from tests.support.waits import wait_for


def broker_data_dir(pki: TestPKI, root: Path) -> DataLayout:
    """A fresh data folder holding what a broker reads: CA public files, its TLS pair."""
    layout = DataLayout(root)
    layout.ca_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        pki.layout.root_cert,
        pki.layout.chain,
        pki.layout.issuing_cert,
        pki.layout.ca_meta,
    ):
        shutil.copy(src, layout.ca_dir / src.name)
    if not pki.layout.server_cert("broker").exists():
        pki.server("broker")
    layout.tls_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.layout.server_cert("broker"), layout.server_cert("broker"))
    shutil.copy(pki.layout.server_key("broker"), layout.server_key("broker"))
    return layout


def broker_settings(layout: DataLayout, **overrides: object) -> BrokerSettings:
    """Settings of a test broker in ``layout``: ephemeral ports, no registry, short
    handshake and CONNECT deadlines (2 s); ``overrides`` win."""
    values: dict[str, object] = {
        "data_dir": layout.root,
        "broker_addr": "127.0.0.1:0",
        "broker_metrics_addr": "127.0.0.1:0",
        "registry_url": None,
        "broker_handshake_timeout_s": 2.0,
        "broker_connect_timeout_s": 2.0,
    }
    values.update(overrides)
    return BrokerSettings(**values)  # type: ignore[arg-type]


def feed_broker_layout(pki: TestPKI, root: Path) -> DataLayout:
    """Broker data folder plus its service/broker client certificate for the feed."""
    layout = broker_data_dir(pki, root)
    service = pki.client(IdentityKind.SERVICE, "broker")
    layout.clients_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(service.cert, layout.client_cert("broker"))
    shutil.copy(service.key, layout.client_key("broker"))
    return layout


def certfleet_broker_settings(pki: TestPKI, root: Path, **overrides: object) -> BrokerSettings:
    """Settings for our broker in a fresh data folder ``root`` holding the session CA's public
    files, with the broker's default handshake deadlines and no metrics listener."""
    values: dict[str, object] = {
        "data_dir": broker_data_dir(pki, root).root,
        "broker_addr": "127.0.0.1:0",
        "broker_metrics_addr": None,
        "registry_url": None,
    }
    values.update(overrides)
    return BrokerSettings(**values)  # type: ignore[arg-type]


def register(operator: httpx.Client, files: ClientFiles, device_id: str) -> None:
    """Register the device certificate in ``files`` through the operator's REST client."""
    response = operator.post(
        "/devices",
        json={"certificate_pem": files.cert.read_text(), "hardware_serial": f"hw-{device_id}"},
    )
    assert response.status_code in (200, 201), response.text


def following_nodes(
    start_node: Callable[..., BrokerServer], registry_url: str, names: str = "ab"
) -> list[BrokerServer]:
    """Broker nodes (one per letter of ``names``) following the registry's feed, each ready
    (``not_ready()`` empty) within 15 s."""
    nodes = [start_node(name, registry_url=registry_url, broker_feed_wait_s=30) for name in names]
    for node in nodes:
        app = node.app
        assert app is not None and app.follower is not None
        assert wait_for(lambda app=app: not app.not_ready(), 15), app.not_ready()
    return nodes


def mqtt_registry_settings(
    data_dir: Path, broker_port: int, **overrides: object
) -> RegistrySettings:
    """Settings of a test registry whose MQTT client (telemetry, renewals) uses the broker on
    ``broker_port``: an ephemeral port, SQLite in ``data_dir``, no verify processes;
    ``overrides`` win."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "registry_addr": "127.0.0.1:0",
        "registry_database_url": f"sqlite:///{data_dir / 'registry.db'}",
        "registry_verify_processes": 0,
        "telemetry_broker_addr": f"127.0.0.1:{broker_port}",
    }
    values.update(overrides)
    return RegistrySettings(**values)  # type: ignore[arg-type]


def operator_client(pki: TestPKI, registry_url: str, name: str = "alice") -> httpx.Client:
    """Operator ``name``'s mTLS REST client of the registry at ``registry_url`` (close it)."""
    files = pki.client(IdentityKind.OPERATOR, name)
    return httpx.Client(
        base_url=f"{registry_url}/api/v1", verify=tls_context(pki, files), timeout=30
    )
