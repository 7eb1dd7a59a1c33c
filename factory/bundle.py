"""Writing device bundles fast: ``devices/<id>/`` in the one format of
:mod:`fleetcore.bundle_format` (also written by devices that enroll themselves over EST).
Written into a temporary folder and renamed into place, so a bundle either exists complete
or not at all.

chain.pem and root.crt are the same in every bundle a CA issues. A provisioning run writes
them once per worker (:class:`SharedCAFiles`) and hard-links them into each bundle: two
fewer inodes and page-cache pages per device, which is a third of a bundle's filesystem
cost. Every writer in certfleet replaces files by rename, never in place, so a linked file
is never changed under another bundle; a copy (``cp -r``, tar, rsync) gets plain files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from factory.errors import ProvisionError
from fleetcore.bundle_format import (
    CERT_FILE,
    CHAIN_FILE,
    INFO_FILE,
    KEY_FILE,
    ROOT_FILE,
)

__all__ = [
    "BundleContents",
    "SharedCAFiles",
    "clear_temp_bundles",
    "read_bundle",
    "write_bundle",
]

#: Links made to one shared pair before a new pair is written. ext4 refuses a 65,001st link
#: to one inode (EMLINK); staying well under it means the limit is never met in practice.
LINKS_PER_SHARED_PAIR = 50_000

#: Shared pairs live in the temporary folder under this prefix; bundles being written do not.
SHARED_PREFIX = ".ca-files-"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BundleContents:
    """What a finished bundle says about its device."""

    certificate: x509.Certificate
    certificate_pem: str
    info: dict[str, Any]


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class SharedCAFiles:
    """chain.pem and root.crt for the bundles one process writes: hard links to a pair kept
    in the temporary folder, or plain copies where the filesystem has no hard links.

    Not shared between processes: each keeps its own pair, named after its pid.
    """

    def __init__(self, temp_root: Path | str, *, chain_pem: bytes, root_pem: bytes) -> None:
        self.temp_root = str(temp_root)
        self.chain_pem = chain_pem
        self.root_pem = root_pem
        self._pair_dir: str | None = None
        self._pairs_made = 0
        self._links_left = 0
        self.linking = True

    def place(self, bundle_dir: str) -> None:
        """Put chain.pem and root.crt into ``bundle_dir`` (a folder not yet renamed)."""
        if self.linking:
            try:
                self._link(bundle_dir)
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.ENOSYS):
                    raise
                self.linking = False
                log.info("no hard links on this filesystem (%s); writing copies", exc.strerror)
                _remove_ca_files(bundle_dir)  # a link made before the failure: start clean
        _write(f"{bundle_dir}/{CHAIN_FILE}", self.chain_pem, 0o644)
        _write(f"{bundle_dir}/{ROOT_FILE}", self.root_pem, 0o644)

    def _link(self, bundle_dir: str) -> None:
        if self._links_left <= 0:
            self._new_pair()
        assert self._pair_dir is not None
        try:
            os.link(f"{self._pair_dir}/{CHAIN_FILE}", f"{bundle_dir}/{CHAIN_FILE}")
            os.link(f"{self._pair_dir}/{ROOT_FILE}", f"{bundle_dir}/{ROOT_FILE}")
        except OSError as exc:
            if exc.errno != errno.EMLINK:  # a filesystem with a lower link limit than ext4
                raise
            _remove_ca_files(bundle_dir)
            self._new_pair()
            os.link(f"{self._pair_dir}/{CHAIN_FILE}", f"{bundle_dir}/{CHAIN_FILE}")
            os.link(f"{self._pair_dir}/{ROOT_FILE}", f"{bundle_dir}/{ROOT_FILE}")
        self._links_left -= 1

    def _new_pair(self) -> None:
        self._pairs_made += 1
        pair_dir = f"{self.temp_root}/{SHARED_PREFIX}{os.getpid()}-{self._pairs_made}"
        os.mkdir(pair_dir, 0o755)
        _write(f"{pair_dir}/{CHAIN_FILE}", self.chain_pem, 0o644)
        _write(f"{pair_dir}/{ROOT_FILE}", self.root_pem, 0o644)
        self._pair_dir = pair_dir
        self._links_left = LINKS_PER_SHARED_PAIR


def _remove_ca_files(bundle_dir: str) -> None:
    for name in (CHAIN_FILE, ROOT_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{bundle_dir}/{name}")


def write_bundle(
    temp_dir: Path | str,
    final_dir: Path | str,
    *,
    certificate_pem: bytes,
    key_pem: bytes,
    ca_files: SharedCAFiles,
    info_json: bytes,
) -> None:
    """Write the five files into ``temp_dir`` and rename it to ``final_dir`` atomically."""
    base = str(temp_dir)
    try:
        os.mkdir(base, 0o755)
    except FileExistsError:  # left by a worker that died; the run start normally clears these
        shutil.rmtree(base)
        os.mkdir(base, 0o755)
    _write(f"{base}/{KEY_FILE}", key_pem, 0o600)
    _write(f"{base}/{CERT_FILE}", certificate_pem, 0o644)
    ca_files.place(base)
    _write(f"{base}/{INFO_FILE}", info_json, 0o644)
    os.rename(base, final_dir)


def read_bundle(device_dir: Path) -> BundleContents:
    """Load a finished bundle's certificate and device.json; ProvisionError if unusable."""
    try:
        certificate_pem = (device_dir / CERT_FILE).read_bytes()
        info = json.loads((device_dir / INFO_FILE).read_bytes())
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"bundle {device_dir} exists but is unusable ({exc}); it was not written by this "
            "factory or was damaged: move it away and run again"
        ) from None
    if not isinstance(info, dict):
        raise ProvisionError(f"bundle {device_dir}/{INFO_FILE} is not a JSON object")
    return BundleContents(certificate, certificate_pem.decode(), info)


def clear_temp_bundles(temp_root: Path) -> int:
    """Remove half-written bundles (and shared CA file pairs) left in the temporary folder;
    return how many bundles."""
    if not temp_root.exists():
        return 0
    removed = 0
    for entry in os.scandir(temp_root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        if not entry.name.startswith(SHARED_PREFIX):
            removed += 1
    return removed
