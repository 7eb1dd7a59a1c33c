"""A device's credentials as the factory wrote them: ``<data>/devices/<device-id>/``.

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
from fleetcore.layout import write_private, write_public
from fleetcore.tls import TlsSetupError, client_context

__all__ = ["DeviceBundle", "discover_bundles", "tls_context", "write_enrolled_bundle"]

_REQUIRED_FILES = ("device.crt", "device.key", "root.crt", "device.json")


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
            meta = json.loads((directory / "device.json").read_text())
            device_id = str(meta["device_id"])
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"{directory / 'device.json'} is unreadable: {exc}") from None
        broker = meta.get("broker")
        return cls(
            device_id=device_id,
            cert=directory / "device.crt",
            key=directory / "device.key",
            root=directory / "root.crt",
            broker=str(broker) if broker else None,
        )


def discover_bundles(data_dir: Path, limit: int | None = None) -> list[DeviceBundle]:
    """Device bundles under ``data_dir/devices``, sorted by directory name; the first ``limit``."""
    devices_dir = data_dir / "devices"
    if not devices_dir.is_dir():
        raise BundleError(
            f"no device bundles in {devices_dir}: provision devices first "
            "('certfleet factory provision') or pass --data-dir"
        )
    directories = sorted(p for p in devices_dir.iterdir() if p.is_dir())
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
    info: dict[str, str | None],
) -> DeviceBundle:
    """Write the bundle of a device that enrolled itself (EST), in the factory's layout
    (device.crt, device.key 0600, chain.pem, root.crt, device.json): into a hidden sibling
    folder, renamed into place, so it exists complete or not at all. device_sim may not
    import the factory (tests/architecture), so the device writes its own flash here."""
    temporary = directory.with_name(f".{directory.name}.enroll-tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    write_private(temporary / "device.key", key_pem)
    write_public(temporary / "device.crt", certificate_pem)
    write_public(temporary / "chain.pem", chain_pem)
    write_public(temporary / "root.crt", root_pem)
    write_public(temporary / "device.json", (json.dumps(info, indent=2) + "\n").encode())
    os.rename(temporary, directory)
    return DeviceBundle.load(directory)
