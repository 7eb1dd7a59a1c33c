"""The session PKI (one CA minted by our own factory) and the credentials tests write from it."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from factory.ca import CertificateAuthority, IssuedCertificate, write_issued
from fleetcore.layout import DataLayout, write_public
from fleetcore.profile import IdentityKind, serial_hex

TRUST_DOMAIN = "fleet.test"


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


def new_pki(root: Path) -> TestPKI:
    """A fresh CA (root + issuing) in ``root``, for the session's ``pki`` fixture."""
    layout = DataLayout(root)
    return TestPKI(ca=CertificateAuthority.init(layout, TRUST_DOMAIN), layout=layout)


def registry_data_dir(pki: TestPKI, root: Path) -> Path:
    """A signing registry's data folder (the CA with its issuing key, its service cert)."""
    return pki.registry_data_dir(root).root


def issue_device(
    pki: TestPKI,
    directory: Path,
    device_id: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ca: CertificateAuthority | None = None,
) -> ClientFiles:
    """A device certificate written to ``directory`` (leaf only, like a device bundle)."""
    authority = ca or pki.ca
    issued = authority.issue_client(
        authority.identity(IdentityKind.DEVICE, device_id),
        not_before=not_before,
        not_after=not_after,
    )
    cert, key = directory / f"{device_id}.crt", directory / f"{device_id}.key"
    write_issued(issued, cert, key)
    return ClientFiles(cert, key, pki.layout.root_cert, issued.certificate.serial_number)


def pem(issued: IssuedCertificate) -> str:
    """The certificate of ``issued`` as PEM text."""
    return issued.certificate_pem.decode()


def unique_id(prefix: str = "dev") -> str:
    """An id no other test uses (for tests sharing one server or database)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def write_device_bundle(ca: CertificateAuthority, data_dir: Path, device_id: str) -> int:
    """A device bundle as the factory writes it; returns the certificate serial."""
    layout = DataLayout(data_dir)
    directory = layout.device_dir(device_id)
    issued = ca.issue_client(ca.identity(IdentityKind.DEVICE, device_id))
    write_issued(issued, directory / "device.crt", directory / "device.key")
    write_public(directory / "chain.pem", ca.chain_pem)
    write_public(directory / "root.crt", ca.root_pem)
    cert = issued.certificate
    meta = {
        "device_id": device_id,
        "hardware_serial": None,
        "serial": serial_hex(cert.serial_number),
        "identity": ca.identity(IdentityKind.DEVICE, device_id).uri,
        "trust_domain": ca.trust_domain,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "broker": "127.0.0.1:8883",
    }
    write_public(directory / "device.json", json.dumps(meta).encode())
    return cert.serial_number


@dataclass
class Fleet:
    """A data folder with device bundles (dev-0000 .. dev-NNNN) from the session CA."""

    data_dir: Path
    serials: dict[str, int]
