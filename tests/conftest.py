"""Session-wide fixtures: one CA minted by our own factory for the whole test run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from factory.ca import CertificateAuthority, write_issued
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind

TRUST_DOMAIN = "fleet.test"

# `alone`: a test that asserts a wall-clock bound (a decommission cut within 1 s, keep-alive
# expiry, bursts answered in time, a node killed under load) carries `@pytest.mark.alone` (or a
# module-level `pytestmark`) itself; `make test` runs those one after another on their own, after
# the rest have run in parallel (xdist). Nothing is marked by folder.


# The broker's metrics port defaults to 127.0.0.1:9883; brokers the tests start (in
# process or as `certfleet broker serve`) take an ephemeral one, so test runs never collide.
os.environ.setdefault("CERTFLEET_BROKER_METRICS_ADDR", "127.0.0.1:0")


@dataclass
class ClientFiles:
    """A client certificate and key on disk, with the CA files a TLS client needs."""

    cert: Path
    key: Path
    root: Path
    serial: int


@dataclass
class TestPKI:
    """The session CA plus helpers that write client and server credentials to disk."""

    __test__ = False  # not a test class, despite the name

    ca: CertificateAuthority
    layout: DataLayout

    def client(self, kind: IdentityKind, name: str) -> ClientFiles:
        """Issue (once) and write a client certificate for ``kind``/``name``."""
        cert_path = self.layout.client_cert(f"{kind.value}-{name}")
        key_path = self.layout.client_key(f"{kind.value}-{name}")
        issued = self.ca.issue_client(self.ca.identity(kind, name))
        write_issued(issued, cert_path, key_path)
        return ClientFiles(
            cert_path, key_path, self.layout.root_cert, issued.certificate.serial_number
        )

    def server(self, name: str) -> tuple[Path, Path]:
        """Issue and write a server certificate for 127.0.0.1/localhost."""
        issued = self.ca.issue_server(name, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        write_issued(
            issued,
            self.layout.server_cert(name),
            self.layout.server_key(name),
            intermediate=self.ca.issuing_cert,
        )
        return self.layout.server_cert(name), self.layout.server_key(name)

    def registry_data_dir(self, root: Path, *, signing: bool = True) -> DataLayout:
        """A registry's data folder: the CA (with its issuing key when the registry signs
        renewals, else the root certificate only) and the registry's service certificate."""
        layout = DataLayout(root)
        if signing:
            shutil.copytree(self.layout.ca_dir, layout.ca_dir)
        else:
            layout.ca_dir.mkdir(parents=True)
            shutil.copy(self.layout.root_cert, layout.root_cert)
        service = self.client(IdentityKind.SERVICE, "registry")
        layout.clients_dir.mkdir(parents=True)
        shutil.copy(service.cert, layout.client_cert("registry"))
        shutil.copy(service.key, layout.client_key("registry"))
        return layout


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestPKI]:
    """A CA (root + issuing) in a temporary data folder, shared by the whole session."""
    layout = DataLayout(tmp_path_factory.mktemp("certfleet-data"))
    ca = CertificateAuthority.init(layout, TRUST_DOMAIN)
    yield TestPKI(ca=ca, layout=layout)
