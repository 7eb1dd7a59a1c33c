"""Factory test helpers: a fresh CA per test where a test writes into the data folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from factory.ca import CertificateAuthority
from factory.cli import ca_app, factory_app
from fleetcore.layout import DataLayout
from tests.softhsm import softhsm  # a fixture of the PKCS#11 tests
from tests.support.processes import CERTFLEET, run_certfleet

__all__ = [
    "CERTFLEET",
    "TRUST_DOMAIN",
    "ca",
    "layout",
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
