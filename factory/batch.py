"""What a provisioning batch is made of: device ids from ``--count`` or a serials CSV.

Every device gets a *rank* (its index, or its CSV row) that fixes its place in the stagger
window, so re-running the same input gives the same ids in the same places.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from factory.errors import ProvisionError
from fleetcore.errors import IdentityError
from fleetcore.profile import check_device_id, check_name

__all__ = ["DeviceSpec", "counted_devices", "read_serials_csv"]

_HARDWARE_SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device to provision."""

    rank: int
    device_id: str
    hardware_serial: str | None


def _check_prefix(prefix: str) -> str:
    try:
        return check_name(prefix, "device id prefix")
    except IdentityError as exc:
        raise ProvisionError(str(exc)) from None


def counted_devices(count: int, prefix: str = "dev") -> Iterator[DeviceSpec]:
    """``<prefix>-000001`` .. ``<prefix>-<count>``: deterministic, so a re-run resumes."""
    if count < 1:
        raise ProvisionError(f"--count must be at least 1 (got {count})")
    _check_prefix(prefix)
    if len(f"{prefix}-{count:06d}") > 64:
        raise ProvisionError(f"device id prefix {prefix!r} is too long for 64-character ids")
    return (DeviceSpec(index, f"{prefix}-{index:06d}", None) for index in range(1, count + 1))


def read_serials_csv(path: Path, prefix: str = "dev") -> list[DeviceSpec]:
    """Read hardware serials from a CSV with a ``hardware_serial`` column (and optionally
    ``device_id``; else the id is ``<prefix>-<hardware_serial>``).

    Raises ProvisionError naming the file and line for: a missing file, no header, no
    ``hardware_serial`` column, a row with the wrong number of fields, an empty or invalid
    value, a duplicate serial or device id, or no rows at all.
    """
    _check_prefix(prefix)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ProvisionError(f"serials file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ProvisionError(f"serials file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ProvisionError(f"serials file {path} cannot be read: {exc.strerror}") from None

    reader = csv.reader(text.splitlines(), strict=True)
    specs: list[DeviceSpec] = []
    seen_serials: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    header: list[str] | None = None
    serial_col = id_col = -1
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                if "hardware_serial" not in header:
                    raise ProvisionError(
                        f"{path} line {line}: the header needs a 'hardware_serial' column "
                        f"(found: {', '.join(header)})"
                    )
                serial_col = header.index("hardware_serial")
                id_col = header.index("device_id") if "device_id" in header else -1
                continue
            if len(row) != len(header):
                raise ProvisionError(
                    f"{path} line {line}: expected {len(header)} fields like the header, "
                    f"found {len(row)}"
                )
            serial = row[serial_col].strip()
            if not _HARDWARE_SERIAL.fullmatch(serial):
                raise ProvisionError(
                    f"{path} line {line}: hardware serial {serial!r} is empty or has invalid "
                    "characters (allowed: A-Z a-z 0-9 . _ -, at most 64)"
                )
            device_id = row[id_col].strip() if id_col >= 0 else f"{prefix}-{serial}"
            try:
                check_device_id(device_id)
            except IdentityError as exc:
                raise ProvisionError(f"{path} line {line}: {exc}") from None
            if serial in seen_serials:
                raise ProvisionError(
                    f"{path} line {line}: duplicate hardware serial {serial!r} "
                    f"(first on line {seen_serials[serial]})"
                )
            if device_id in seen_ids:
                raise ProvisionError(
                    f"{path} line {line}: duplicate device id {device_id!r} "
                    f"(first on line {seen_ids[device_id]})"
                )
            seen_serials[serial] = line
            seen_ids[device_id] = line
            specs.append(DeviceSpec(len(specs) + 1, device_id, serial))
    except csv.Error as exc:
        raise ProvisionError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    if header is None:
        raise ProvisionError(f"serials file {path} is empty: expected a 'hardware_serial' header")
    if not specs:
        raise ProvisionError(f"serials file {path} has a header but no device rows")
    return specs
