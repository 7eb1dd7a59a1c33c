"""A device bundle: ``devices/<id>/`` with device.crt, device.key, chain.pem, root.crt,
device.json. Written into a temporary folder and renamed into place, so a bundle either
exists complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from factory.errors import ProvisionError

__all__ = [
    "BUNDLE_FILES",
    "BundleContents",
    "bundle_info",
    "clear_temp_bundles",
    "read_bundle",
    "write_bundle",
]

BUNDLE_FILES = ("device.crt", "device.key", "chain.pem", "root.crt", "device.json")


@dataclass(frozen=True, slots=True)
class BundleContents:
    """What a finished bundle says about its device."""

    certificate: x509.Certificate
    certificate_pem: str
    info: dict[str, Any]


def bundle_info(
    *,
    device_id: str,
    hardware_serial: str | None,
    serial: str,
    identity: str,
    trust_domain: str,
    not_before: str,
    not_after: str,
    broker: str,
) -> bytes:
    """device.json, as the device reads it (indented; built with the C encoder per value)."""
    fields = (
        ("device_id", device_id),
        ("hardware_serial", hardware_serial),
        ("serial", serial),
        ("identity", identity),
        ("trust_domain", trust_domain),
        ("not_before", not_before),
        ("not_after", not_after),
        ("broker", broker),
    )
    body = ",\n".join(f'  "{name}": {_dumps(value)}' for name, value in fields)
    return f"{{\n{body}\n}}\n".encode()


_dumps = json.JSONEncoder(ensure_ascii=True).encode


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_bundle(
    temp_dir: Path | str,
    final_dir: Path | str,
    *,
    certificate_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes,
    root_pem: bytes,
    info_json: bytes,
) -> None:
    """Write the five files into ``temp_dir`` and rename it to ``final_dir`` atomically."""
    base = str(temp_dir)
    try:
        os.mkdir(base, 0o755)
    except FileExistsError:  # left by a worker that died; the run start normally clears these
        shutil.rmtree(base)
        os.mkdir(base, 0o755)
    _write(f"{base}/device.key", key_pem, 0o600)
    _write(f"{base}/device.crt", certificate_pem, 0o644)
    _write(f"{base}/chain.pem", chain_pem, 0o644)
    _write(f"{base}/root.crt", root_pem, 0o644)
    _write(f"{base}/device.json", info_json, 0o644)
    os.rename(base, final_dir)


def read_bundle(device_dir: Path) -> BundleContents:
    """Load a finished bundle's certificate and device.json; ProvisionError if unusable."""
    try:
        certificate_pem = (device_dir / "device.crt").read_bytes()
        info = json.loads((device_dir / "device.json").read_bytes())
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"bundle {device_dir} exists but is unusable ({exc}); it was not written by this "
            "factory or was damaged: move it away and run again"
        ) from None
    if not isinstance(info, dict):
        raise ProvisionError(f"bundle {device_dir}/device.json is not a JSON object")
    return BundleContents(certificate, certificate_pem.decode(), info)


def clear_temp_bundles(temp_root: Path) -> int:
    """Remove half-written bundles left by a killed run; return how many."""
    if not temp_root.exists():
        return 0
    removed = 0
    for entry in os.scandir(temp_root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        removed += 1
    return removed
