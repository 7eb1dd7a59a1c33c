"""Data folders and settings of the servers tests start in process (broker, registry)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from broker.settings import BrokerSettings
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from tests.support.pki import ClientFiles, TestPKI


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
