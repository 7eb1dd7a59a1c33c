"""Where everything lives inside one certfleet data folder (DESIGN.md, "Defaults")."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_DATA_DIR", "DataLayout", "write_durable", "write_private", "write_public"]

DEFAULT_DATA_DIR = Path("certfleet-data")


@dataclass(frozen=True)
class DataLayout:
    """Paths inside a data folder; nothing is created until asked."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root.crt"

    @property
    def root_key(self) -> Path:
        return self.ca_dir / "root.key"

    @property
    def issuing_cert(self) -> Path:
        return self.ca_dir / "issuing.crt"

    @property
    def issuing_key(self) -> Path:
        return self.ca_dir / "issuing.key"

    @property
    def chain(self) -> Path:
        """Issuing certificate followed by the root, PEM."""
        return self.ca_dir / "chain.pem"

    @property
    def ca_meta(self) -> Path:
        return self.ca_dir / "ca.json"

    @property
    def issuers_dir(self) -> Path:
        """Earlier issuing CAs still trusted after a rollover: ``<key id>.crt`` and ``.key``."""
        return self.ca_dir / "issuers"

    @property
    def retired_dir(self) -> Path:
        """Issuing CAs retired (no live certificate left) or revoked: kept, no longer trusted."""
        return self.ca_dir / "retired"

    @property
    def trust(self) -> Path:
        """Every trusted issuing CA (current first) followed by the root, PEM: what servers
        verify client certificates against (written by ``ca init`` and ``ca rollover``)."""
        return self.ca_dir / "trust.pem"

    @property
    def server_trust(self) -> Path:
        """The CA file a server verifies clients with: ``trust.pem``, else ``chain.pem`` (a
        data folder made before rollovers existed)."""
        return self.trust if self.trust.exists() else self.chain

    @property
    def revoked_issuers(self) -> Path:
        """The root-signed CRL listing revoked issuing CAs (``ca revoke-issuing``), DER."""
        return self.ca_dir / "revoked-issuers.crl"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    def device_dir(self, device_id: str) -> Path:
        return self.devices_dir / device_id

    @property
    def provision_tmp_dir(self) -> Path:
        """Half-written device bundles; renamed into ``devices/`` when complete."""
        return self.root / ".provision-tmp"

    @property
    def provision_lock(self) -> Path:
        """Held (flock) by the one provisioning run allowed per data folder."""
        return self.root / ".provision.lock"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def registry_db(self) -> Path:
        return self.root / "registry.db"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    def server_cert(self, name: str) -> Path:
        return self.tls_dir / f"{name}.crt"

    def server_key(self, name: str) -> Path:
        return self.tls_dir / f"{name}.key"

    @property
    def clients_dir(self) -> Path:
        return self.root / "clients"

    def client_cert(self, name: str) -> Path:
        return self.clients_dir / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.clients_dir / f"{name}.key"

    @property
    def broker_dir(self) -> Path:
        """Broker state (the last revoked set)."""
        return self.root / "broker"


def _temporary_beside(path: Path) -> Path:
    # Per process and thread: two writers of one file (broker nodes in one process, a
    # writer thread beside the loop) must not share a temporary file.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # umask must not widen or narrow what we ask for
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_durable(path: Path, data: bytes | list[bytes | bytearray], mode: int = 0o600) -> None:
    """Write state that must survive a crash: a temporary file written in full and
    fsynced, renamed over ``path``, then the folder fsynced (the rename itself is durable).
    A crash leaves either the old file or the new one, never a mix. ``data`` may be a list
    of parts, written one after the other (no copy of large ones into one buffer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        for part in [data] if isinstance(data, bytes) else data:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_private(path: Path, data: bytes) -> None:
    """Write secret material atomically with mode 0600."""
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write public material (certificates, JSON) atomically with mode 0644."""
    _write_atomic(path, data, 0o644)
