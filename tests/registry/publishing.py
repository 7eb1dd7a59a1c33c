"""A registry that publishes: a CA whose certificates name its publication listener, the
registry serving it on an ephemeral port, and an operator client (shared by the tests of
the publication listener and of ``certificate inspect``)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from factory.ca import CertificateAuthority, write_issued
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.support.ports import free_port

__all__ = ["Published", "free_port", "published"]

TRUST_DOMAIN = "fleet.pub"


@dataclass
class Published:
    """A CA that publishes at ``publish_url``, a registry serving it, and an operator."""

    ca: CertificateAuthority
    layout: DataLayout
    registry: RegistryServer
    publish_url: str
    operator: httpx.Client

    def device(self, device_id: str, *, register: bool = True) -> tuple[Path, Path]:
        """Mint a device certificate (registered unless told not to); its files on disk."""
        issued = self.ca.issue_client(self.ca.identity(IdentityKind.DEVICE, device_id))
        cert = self.layout.root / f"{device_id}.crt"
        key = self.layout.root / f"{device_id}.key"
        write_issued(issued, cert, key)
        if register:
            response = self.operator.post(
                "/devices", json={"certificate_pem": issued.certificate_pem.decode()}
            )
            assert response.status_code == 201, response.text
        return cert, key

    def decommission(self, device_id: str, reason_code: str | None = None) -> None:
        body = {"reason": "stolen from the field"}
        if reason_code is not None:
            body["reason_code"] = reason_code
        response = self.operator.post(f"/devices/{device_id}/decommission", json=body)
        assert response.status_code == 200, response.text


@pytest.fixture
def published(tmp_path: Path) -> Iterator[Published]:
    port = free_port()
    publish_url = f"http://127.0.0.1:{port}"
    layout = DataLayout(tmp_path / "data")
    ca = CertificateAuthority.init(layout, TRUST_DOMAIN, publish_url=publish_url)
    operator_cert = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "alice"))
    write_issued(operator_cert, layout.client_cert("alice"), layout.client_key("alice"))
    settings = RegistrySettings(
        data_dir=layout.root,
        registry_addr="127.0.0.1:0",
        registry_publish_addr=f"127.0.0.1:{port}",
        registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}",
    )
    context = ssl.create_default_context(cafile=str(layout.root_cert))
    context.load_cert_chain(str(layout.client_cert("alice")), str(layout.client_key("alice")))
    with RegistryServer(settings) as registry:
        assert registry.publication is not None and registry.publication.url == publish_url
        with httpx.Client(
            base_url=f"{registry.url}/api/v1", verify=context, timeout=30
        ) as operator:
            yield Published(ca, layout, registry, publish_url, operator)
