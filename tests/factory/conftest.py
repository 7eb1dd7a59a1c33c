"""Factory test helpers: a fresh CA per test where a test writes into the data folder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from factory.ca import CertificateAuthority, write_issued
from factory.cli import ca_app, factory_app
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from tests.softhsm import softhsm  # a fixture of the PKCS#11 tests
from tests.support.processes import CERTFLEET, run_certfleet

__all__ = [
    "CERTFLEET",
    "TRUST_DOMAIN",
    "ca",
    "layout",
    "registry_url",
    "run_ca",
    "run_certfleet",
    "run_factory",
    "softhsm",
]

TRUST_DOMAIN = "fleet.test"


@pytest.fixture
def layout(tmp_path: Path) -> DataLayout:
    return DataLayout(tmp_path / "data")


@pytest.fixture
def ca(layout: DataLayout) -> CertificateAuthority:
    """A fresh CA of its own (tests here write devices, manifests and client files)."""
    return CertificateAuthority.init(layout, TRUST_DOMAIN)


def run_ca(args: Sequence[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(ca_app, list(args), env=env)


def run_factory(args: Sequence[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(factory_app, list(args), env=env)


@pytest.fixture
def registry_url(ca: CertificateAuthority, layout: DataLayout) -> Iterator[str]:
    """A real registry on the factory's data folder, with factory and operator clients."""
    from registry.server import RegistryServer
    from registry.settings import build_settings

    for name, kind in (("factory", IdentityKind.SERVICE), ("ops", IdentityKind.OPERATOR)):
        write_issued(
            ca.issue_client(ca.identity(kind, name)),
            layout.client_cert(name),
            layout.client_key(name),
        )
    server = ca.issue_server("registry", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    write_issued(
        server,
        layout.server_cert("registry"),
        layout.server_key("registry"),
        intermediate=ca.issuing_cert,
    )
    settings = build_settings(data_dir=layout.root, registry_addr="127.0.0.1:0")
    with RegistryServer(settings) as running:
        yield running.url
