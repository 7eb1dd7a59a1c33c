"""A device's key and certificate on disk, swapped in two phases so a crash never leaves a
bundle that cannot connect.

A factory bundle holds ``device.crt`` and ``device.key`` as plain files. Two files cannot be
replaced together atomically, so on its first renewal the device moves to generations:

    devices/<id>/generations/<serial>/device.crt, device.key   one pair per certificate
    devices/<id>/current  -> generations/<serial>              the pair the device uses
    devices/<id>/device.crt -> current/device.crt               (the paths every reader uses)
    devices/<id>/device.key -> current/device.key
    devices/<id>/pending  -> generations/<new serial>           staged, not yet proven
    devices/<id>/previous -> generations/<old serial>           kept after a promotion

The steps, each leaving ``device.crt`` + ``device.key`` a matching pair that connects:

1. :meth:`CredentialStore.stage` (adopting a plain bundle first: copy the pair into its
   generation, point ``current`` at it, then replace each plain file by a link with the same
   content) writes the new pair into its own generation and only then links ``pending`` to
   it. A crash leaves at most an unreferenced generation or a ``pending`` that was never
   used; ``current`` is untouched.
2. The device connects with :meth:`pending` credentials. If that fails,
   :meth:`discard` removes them.
3. :meth:`promote`, only after that connection succeeded: ``previous`` is linked to the old
   generation, then one rename turns ``pending`` into ``current``: the old pair is in use up
   to that rename, the new one from it on. ``device.json`` (serial, validity) follows; the
   certificate file is the truth if a crash comes between.

Generations older than ``previous`` are removed after a promotion.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from device_sim.errors import BundleError
from fleetcore.layout import write_private, write_public
from fleetcore.profile import serial_hex

__all__ = ["CredentialStore", "Credentials"]

CERT, KEY = "device.crt", "device.key"
GENERATIONS = "generations"


@dataclass(frozen=True, slots=True)
class Credentials:
    """One certificate + key pair on disk."""

    cert: Path
    key: Path

    def certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{self.cert} is unreadable: {exc}") from None


def _link(directory: Path, name: str, target: str) -> None:
    """Point ``directory/name`` at ``target`` (relative) with one atomic rename."""
    temporary = directory / f".{name}.link-tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, directory / name)


class CredentialStore:
    """The credentials in one bundle directory (``devices/<id>/``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def current(self) -> Credentials:
        """The pair in use; both paths inside one generation once the bundle has some."""
        target = self.directory / "current"
        if target.is_symlink():
            generation = self.directory / os.readlink(target)
            return Credentials(generation / CERT, generation / KEY)
        return Credentials(self.directory / CERT, self.directory / KEY)

    def pending(self) -> Credentials | None:
        """The staged pair, if there is one."""
        link = self.directory / "pending"
        if not link.is_symlink():
            return None
        generation = self.directory / os.readlink(link)
        if not (generation / CERT).is_file() or not (generation / KEY).is_file():
            return None
        return Credentials(generation / CERT, generation / KEY)

    def previous(self) -> Credentials | None:
        link = self.directory / "previous"
        if not link.is_symlink():
            return None
        generation = self.directory / os.readlink(link)
        return Credentials(generation / CERT, generation / KEY)

    # -- phase 1 ------------------------------------------------------------------------

    def adopt(self) -> None:
        """Move a plain factory bundle to generations (no-op when it has them)."""
        if (self.directory / "current").is_symlink():
            return
        plain = Credentials(self.directory / CERT, self.directory / KEY)
        serial = serial_hex(plain.certificate().serial_number)
        generation = f"{GENERATIONS}/{serial}"
        self._write_generation(serial, plain.key.read_bytes(), plain.cert.read_bytes())
        _link(self.directory, "current", generation)
        # Each plain file becomes a link to the same content: a matching pair at every step.
        _link(self.directory, KEY, f"current/{KEY}")
        _link(self.directory, CERT, f"current/{CERT}")

    def stage(self, key_pem: bytes, cert_pem: bytes) -> Credentials:
        """Write a new pair as pending (phase 1); the current pair stays in use."""
        self.adopt()
        serial = serial_hex(x509.load_pem_x509_certificate(cert_pem).serial_number)
        self._write_generation(serial, key_pem, cert_pem)
        _link(self.directory, "pending", f"{GENERATIONS}/{serial}")
        staged = self.pending()
        assert staged is not None
        return staged

    def _write_generation(self, serial: str, key_pem: bytes, cert_pem: bytes) -> None:
        generation = self.directory / GENERATIONS / serial
        generation.mkdir(parents=True, exist_ok=True)
        write_private(generation / KEY, key_pem)
        write_public(generation / CERT, cert_pem)

    # -- phase 2 ------------------------------------------------------------------------

    def discard(self) -> None:
        """Forget the staged pair (it did not connect)."""
        link = self.directory / "pending"
        if not link.is_symlink():
            return
        generation = self.directory / os.readlink(link)
        link.unlink()
        if generation.resolve() != (self.directory / "current").resolve():
            shutil.rmtree(generation, ignore_errors=True)

    def promote(self) -> Credentials:
        """Make the staged pair current (one rename), keep the old one as previous."""
        link = self.directory / "pending"
        if not link.is_symlink():
            raise BundleError(f"{self.directory} has no staged certificate to promote")
        old = os.readlink(self.directory / "current")
        new = os.readlink(link)
        _link(self.directory, "previous", old)
        os.replace(link, self.directory / "current")
        promoted = self.current()
        self._update_meta(promoted.certificate())
        self._prune(keep={Path(old).name, Path(new).name})
        return promoted

    def _update_meta(self, certificate: x509.Certificate) -> None:
        meta_path = self.directory / "device.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return  # the certificate is the truth; the metadata is a convenience
        meta.update(
            serial=serial_hex(certificate.serial_number),
            not_before=certificate.not_valid_before_utc.isoformat(),
            not_after=certificate.not_valid_after_utc.isoformat(),
        )
        write_public(meta_path, json.dumps(meta, indent=2).encode())

    def _prune(self, keep: set[str]) -> None:
        for generation in (self.directory / GENERATIONS).iterdir():
            if generation.name not in keep:
                shutil.rmtree(generation, ignore_errors=True)
