"""A registry that publishes: a CA whose certificates name its publication listener, the
registry serving it on an ephemeral port, and an operator client (shared by the tests of
the publication listener and of ``certificate inspect``)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

__all__ = [
    "Published",
    "free_port",
    "need_openssl",
    "openssl_ocsp",
    "published",
    "publishing_registry",
    "serve_published",
]

TRUST_DOMAIN = "fleet.pub"
OPENSSL = shutil.which("openssl")


def need_openssl() -> str:
    """The openssl binary; skips the test (visibly) where it is not installed."""
    if OPENSSL is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    return OPENSSL


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


@contextmanager
def publishing_registry(
    tmp_path: Path, *, database_url: str | None = None, **overrides: object
) -> Iterator[Published]:
    """A new publishing CA in ``tmp_path/data`` and a registry serving it (SQLite in
    ``tmp_path`` unless ``database_url``); ``overrides`` are RegistrySettings fields."""
    port = free_port()
    layout = DataLayout(tmp_path / "data")
    ca = CertificateAuthority.init(layout, TRUST_DOMAIN, publish_url=f"http://127.0.0.1:{port}")
    operator_cert = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "alice"))
    write_issued(operator_cert, layout.client_cert("alice"), layout.client_key("alice"))
    with serve_published(
        ca,
        port,
        database_url=database_url or f"sqlite:///{tmp_path / 'registry.db'}",
        **overrides,
    ) as published:
        yield published


@contextmanager
def serve_published(
    ca: CertificateAuthority, port: int, *, database_url: str, **overrides: object
) -> Iterator[Published]:
    """A registry for ``ca`` (made by :func:`publishing_registry`) publishing on ``port``:
    a second one on the same data folder and database is a restart."""
    layout = ca.layout
    publish_url = f"http://127.0.0.1:{port}"
    settings = RegistrySettings(
        data_dir=layout.root,
        registry_addr="127.0.0.1:0",
        registry_publish_addr=f"127.0.0.1:{port}",
        registry_database_url=database_url,
        **overrides,  # type: ignore[arg-type]
    )
    context = ssl.create_default_context(cafile=str(layout.root_cert))
    context.load_cert_chain(str(layout.client_cert("alice")), str(layout.client_key("alice")))
    with RegistryServer(settings) as registry:
        assert registry.publication is not None and registry.publication.url == publish_url
        with httpx.Client(
            base_url=f"{registry.url}/api/v1", verify=context, timeout=30
        ) as operator:
            yield Published(ca, layout, registry, publish_url, operator)


@pytest.fixture
def published(tmp_path: Path) -> Iterator[Published]:
    with publishing_registry(tmp_path) as made:
        yield made


def openssl_ocsp(
    published: Published, *certs: Path, issuer: Path | None = None, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``openssl ocsp`` against the responder (POST, with a nonce): one request for ``certs``
    (one ``-cert`` each) issued by ``issuer`` (default: the current issuing CA), the answer
    verified against the root."""
    command = [need_openssl(), "ocsp", "-issuer", str(issuer or published.layout.issuing_cert)]
    for cert in certs:
        command += ["-cert", str(cert)]
    command += ["-url", f"{published.publish_url}/ocsp", "-CAfile", str(published.layout.root_cert)]
    command += ["-timeout", "10", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
