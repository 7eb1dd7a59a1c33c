"""The manifest: ``manifest.jsonl``, one JSON object per issued certificate, append-only.

Line format (the shared contract)::

    {"device_id", "hardware_serial", "serial", "not_before", "not_after", "issued_at",
     "certificate_pem", "batch_id"}

Lines are appended in whole chunks and fsync'd before the chunk is reported as done. A crash
can leave at most a truncated last line; :meth:`Manifest.repair` drops it (the bundle on disk
lets the provisioning run re-derive it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509

from factory.errors import ProvisionError
from fleetcore.profile import certificate_pem, serial_hex

__all__ = ["MANIFEST_FIELDS", "Manifest", "ManifestRecord", "ManifestWriter"]

log = logging.getLogger(__name__)

MANIFEST_FIELDS = (
    "device_id",
    "hardware_serial",
    "serial",
    "not_before",
    "not_after",
    "issued_at",
    "certificate_pem",
    "batch_id",
)


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """One issued certificate, as one manifest line."""

    device_id: str
    hardware_serial: str | None
    serial: str
    not_before: str
    not_after: str
    issued_at: str
    certificate_pem: str
    batch_id: str

    @classmethod
    def from_certificate(
        cls,
        certificate: x509.Certificate,
        *,
        device_id: str,
        hardware_serial: str | None,
        issued_at: dt.datetime,
        batch_id: str,
    ) -> ManifestRecord:
        return cls(
            device_id=device_id,
            hardware_serial=hardware_serial,
            serial=serial_hex(certificate.serial_number),
            not_before=certificate.not_valid_before_utc.isoformat(),
            not_after=certificate.not_valid_after_utc.isoformat(),
            issued_at=issued_at.isoformat(),
            certificate_pem=certificate_pem(certificate).decode(),
            batch_id=batch_id,
        )

    @classmethod
    def from_json(cls, obj: object) -> ManifestRecord:
        if not isinstance(obj, dict) or any(name not in obj for name in MANIFEST_FIELDS):
            raise ValueError(f"a manifest line needs the fields {', '.join(MANIFEST_FIELDS)}")
        return cls(**{name: obj[name] for name in MANIFEST_FIELDS})

    def to_line(self) -> bytes:
        body = {
            "device_id": self.device_id,
            "hardware_serial": self.hardware_serial,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "issued_at": self.issued_at,
            "certificate_pem": self.certificate_pem,
            "batch_id": self.batch_id,
        }
        return _LINE_ENCODER.encode(body).encode() + b"\n"


#: One encoder for every line (``json.dumps`` with separators makes a new one per call).
_LINE_ENCODER = json.JSONEncoder(separators=(",", ":"))


class Manifest:
    """``manifest.jsonl`` in a data folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def repair(self) -> int:
        """Drop a truncated or unparsable last line left by a crash; return bytes dropped."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size == 0:
            return 0
        with self.path.open("r+b") as handle:
            # Find the start of the last line (the one after the last complete newline).
            block = 1 << 16
            end = size
            handle.seek(size - 1)
            ends_with_newline = handle.read(1) == b"\n"
            search_end = size - 1 if ends_with_newline else size
            start = 0
            pos = search_end
            while pos > 0:
                read_from = max(0, pos - block)
                handle.seek(read_from)
                chunk = handle.read(pos - read_from)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    start = read_from + newline + 1
                    break
                pos = read_from
            handle.seek(start)
            last = handle.read(end - start)
            if ends_with_newline and _parses(last):
                return 0
            handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())
        dropped = end - start
        log.warning("manifest repaired path=%s dropped_bytes=%d", self.path, dropped)
        return dropped

    def records(self) -> Iterator[ManifestRecord]:
        """Every record, in order. Raises ProvisionError naming a corrupt line."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield ManifestRecord.from_json(json.loads(line))
                except ValueError as exc:
                    raise ProvisionError(
                        f"{self.path} line {number} is corrupt ({exc}); restore it from a "
                        "backup or remove that line, then run again"
                    ) from None

    def serials_by_device(self) -> dict[str, list[str]]:
        """device id -> serials issued to it, in manifest order."""
        issued: dict[str, list[str]] = {}
        for record in self.records():
            issued.setdefault(record.device_id, []).append(record.serial)
        return issued

    def writer(self, *, fsync_interval_s: float = 0.0) -> ManifestWriter:
        return ManifestWriter(self.path, fsync_interval_s=fsync_interval_s)


def _parses(line: bytes) -> bool:
    try:
        ManifestRecord.from_json(json.loads(line))
    except ValueError:
        return False
    return True


class ManifestWriter:
    """Appends whole lines and fsyncs them; use as a context manager.

    ``fsync_interval_s`` groups commits: lines are written at once (a killed process loses
    nothing) and fsync'd at most that long after being written, and always on close.
    0 fsyncs every append.
    """

    def __init__(self, path: Path, *, fsync_interval_s: float = 0.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fsync_interval_s = fsync_interval_s
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._last_sync = time.monotonic()
        self._dirty = False

    def append(self, lines: bytes) -> None:
        """Append ``lines`` (each ending in a newline); fsync when the interval has passed."""
        if not lines:
            return
        view = memoryview(lines)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        """Make every appended line durable now."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
