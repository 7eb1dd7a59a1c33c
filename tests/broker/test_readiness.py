"""/readyz beside /metrics and /healthz: ready once listening and following the feed; the
metrics port's documented default."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from registry.server import RegistryServer
from tests.support.pki import TestPKI
from tests.support.ports import free_port
from tests.support.servers import broker_data_dir, broker_settings, feed_broker_layout
from tests.support.waits import wait_for


def probe(broker: BrokerServer, path: str) -> httpx.Response:
    assert broker.metrics_url is not None
    return httpx.get(broker.metrics_url.replace("/metrics", path), timeout=5)


def test_broker_following_a_registry_becomes_ready(
    pki: TestPKI, registry: RegistryServer, tmp_path: Path
) -> None:
    layout = feed_broker_layout(pki, tmp_path / "broker")
    with BrokerServer(broker_settings(layout, registry_url=registry.url)) as broker:
        assert wait_for(lambda: probe(broker, "/readyz").status_code == 200, timeout=15)
        assert probe(broker, "/readyz").json() == {"status": "ready", "waiting_for": []}
        assert probe(broker, "/healthz").json()["status"] == "ok"
        assert "certfleet_broker_connections" in probe(broker, "/metrics").text


def test_broker_whose_registry_is_unreachable_is_not_ready(pki: TestPKI, tmp_path: Path) -> None:
    layout = feed_broker_layout(pki, tmp_path / "broker")
    nowhere = f"https://127.0.0.1:{free_port()}"
    with BrokerServer(broker_settings(layout, registry_url=nowhere)) as broker:
        response = probe(broker, "/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not ready"
        assert body["waiting_for"] == [
            f"the revocation feed ({nowhere}/api/v1/revocations): not caught up yet"
        ]


def test_a_follower_silent_for_too_long_is_not_ready(
    pki: TestPKI, registry: RegistryServer, tmp_path: Path
) -> None:
    layout = feed_broker_layout(pki, tmp_path / "broker")
    with BrokerServer(broker_settings(layout, registry_url=registry.url)) as broker:
        assert wait_for(lambda: probe(broker, "/readyz").status_code == 200, timeout=15)
        assert broker.app is not None and broker.app.follower is not None
        broker.app.follower.last_success = time.monotonic() - 3600  # the registry went quiet
        body = probe(broker, "/readyz").json()
        assert body["status"] == "not ready"
        assert "no answer for 3600s" in body["waiting_for"][0]


def test_broker_without_a_registry_is_ready_once_listening(pki: TestPKI, tmp_path: Path) -> None:
    layout = broker_data_dir(pki, tmp_path / "broker")
    with BrokerServer(broker_settings(layout)) as broker:
        assert probe(broker, "/readyz").json() == {"status": "ready", "waiting_for": []}


def test_metrics_port_defaults_to_9883(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTFLEET_BROKER_METRICS_ADDR", raising=False)
    assert BrokerSettings().broker_metrics_addr == "127.0.0.1:9883"
