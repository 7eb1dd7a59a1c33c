"""The device bundle on disk, one definition for every writer and reader: the factory's
minted bundles (:mod:`factory.bundle`) and the bundles devices write when they enroll
themselves over EST (:mod:`device_sim.bundle`).

``<data>/devices/<device-id>/`` holds :data:`CERT_FILE` (the leaf), :data:`KEY_FILE` (mode
0600), :data:`CHAIN_FILE` (issuing + root), :data:`ROOT_FILE` and :data:`INFO_FILE`
(:func:`bundle_info`). A bundle is written into a hidden folder (a name starting with a
dot) and renamed into place, so a bundle exists complete or not at all; readers skip
hidden folders (:func:`is_bundle_dir`): they are bundles being written, or left by a
writer that died.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

__all__ = [
    "BUNDLE_FILES",
    "CERT_FILE",
    "CHAIN_FILE",
    "INFO_FILE",
    "KEY_FILE",
    "ROOT_FILE",
    "bundle_info",
    "is_bundle_dir",
    "staging_dir",
]

CERT_FILE: Final = "device.crt"
KEY_FILE: Final = "device.key"
CHAIN_FILE: Final = "chain.pem"
ROOT_FILE: Final = "root.crt"
INFO_FILE: Final = "device.json"
BUNDLE_FILES: Final = (CERT_FILE, KEY_FILE, CHAIN_FILE, ROOT_FILE, INFO_FILE)


def bundle_info(
    *,
    device_id: str,
    hardware_serial: str | None,
    serial: str,
    identity: str,
    trust_domain: str,
    not_before: str,
    not_after: str,
    broker: str | None,
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


_encode = json.JSONEncoder(ensure_ascii=True).encode


def _dumps(value: str | None) -> str:
    return "null" if value is None else _encode(value)


def is_bundle_dir(path: Path) -> bool:
    """True for a finished bundle's folder: a folder whose name is not hidden."""
    return not path.name.startswith(".") and path.is_dir()


def staging_dir(final: Path, purpose: str) -> Path:
    """The hidden sibling folder a bundle for ``final`` is written into before its rename."""
    return final.with_name(f".{final.name}.{purpose}-tmp")
