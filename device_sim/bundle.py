"""A device's credentials as the factory wrote them: ``<data>/devices/<device-id>/``, in the
format of :mod:`fleetcore.bundle_format`.

The simulator reads bundles the way a device would read its flash: the leaf certificate,
its private key, the root it trusts, and ``device.json`` (the device id and broker address).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

from device_sim.errors import BundleError
from fleetcore.bundle_format import (
    CERT_FILE,
    CHAIN_FILE,
    INFO_FILE,
    KEY_FILE,
    ROOT_FILE,
    is_bundle_dir,
    staging_dir,
)
from fleetcore.layout import write_private, write_public
from fleetcore.tls import TlsSetupError, client_context

__all__ = ["DeviceBundle", "discover_bundles", "tls_context", "write_enrolled_bundle"]

_REQUIRED_FILES = (CERT_FILE, KEY_FILE, ROOT_FILE, INFO_FILE)


@dataclass(frozen=True, slots=True)
class DeviceBundle:
    """The files one simulated device needs."""

    device_id: str
    cert: Path
    key: Path
    root: Path
    broker: str | None

    @classmethod
    def load(cls, directory: Path) -> DeviceBundle:
        missing = [name for name in _REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise BundleError(
                f"device bundle {directory} lacks {', '.join(missing)}: "
                "re-run 'certfleet factory provision' for it"
            )
        try:
            meta = json.loads((directory / INFO_FILE).read_text())
            device_id = str(meta["device_id"])
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"{directory / INFO_FILE} is unreadable: {exc}") from None
        broker = meta.get("broker")
        return cls(
            device_id=device_id,
            cert=directory / CERT_FILE,
            key=directory / KEY_FILE,
            root=directory / ROOT_FILE,
            broker=str(broker) if broker else None,
        )


def discover_bundles(data_dir: Path, limit: int | None = None) -> list[DeviceBundle]:
    """Device bundles under ``data_dir/devices``, sorted by directory name; the first ``limit``.
    Hidden folders (bundles being written, or left by a writer that died) are not bundles."""
    devices_dir = data_dir / "devices"
    if not devices_dir.is_dir():
        raise BundleError(
            f"no device bundles in {devices_dir}: provision devices first "
            "('certfleet factory provision') or pass --data-dir"
        )
    directories = sorted(p for p in devices_dir.iterdir() if is_bundle_dir(p))
    if limit is not None:
        if limit > len(directories):
            raise BundleError(
                f"asked for {limit} devices but {devices_dir} holds {len(directories)} bundles"
            )
        directories = directories[:limit]
    if not directories:
        raise BundleError(f"{devices_dir} holds no device bundles")
    return [DeviceBundle.load(d) for d in directories]


def tls_context(
    bundle: DeviceBundle, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """The device's client context (:func:`fleetcore.tls.client_context`): trust the root,
    present the device certificate (or the given pair, e.g. a staged renewal)."""
    try:
        return client_context(bundle.root, cert or bundle.cert, key or bundle.key)
    except TlsSetupError as exc:
        raise BundleError(
            f"device {bundle.device_id}: {exc}: re-provision it ('certfleet factory provision') "
            "or pass the right --data-dir"
        ) from None


def write_enrolled_bundle(
    directory: Path,
    *,
    certificate_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes,
    root_pem: bytes,
    info_json: bytes,
) -> DeviceBundle:
    """Write the bundle of a device that enrolled itself (EST) in the one bundle format
    (:mod:`fleetcore.bundle_format`; ``info_json`` from its ``bundle_info``): into a hidden
    sibling folder, renamed into place, so it exists complete or not at all."""
    temporary = staging_dir(directory, "enroll")
    shutil.rmtree(temporary, ignore_errors=True)
    write_private(temporary / KEY_FILE, key_pem)
    write_public(temporary / CERT_FILE, certificate_pem)
    write_public(temporary / CHAIN_FILE, chain_pem)
    write_public(temporary / ROOT_FILE, root_pem)
    write_public(temporary / INFO_FILE, info_json)
    os.rename(temporary, directory)
    return DeviceBundle.load(directory)
