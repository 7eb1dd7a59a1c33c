"""Provision a batch of devices: mint keys and certificates, write bundles, append the manifest.

Pipeline: the parent cuts the batch into chunks and keeps a bounded number of them in flight
in a pool of minting processes (one per core). A worker mints each device of its chunk and
renames the finished bundle into ``devices/<id>/``; the parent appends the chunk's manifest
lines *in batch order*, fsyncs them, registers them with the registry when asked, and hands
out the next chunk. Memory stays flat with batch size: at most ``workers * 3`` chunks exist
at a time.

Resume (the same command run again after a kill):
- a device with a manifest line is skipped (its bundle was renamed before the line was
  written, so it exists);
- a device with a bundle but no manifest line gets its line from the bundle's certificate,
  never a second certificate;
- half-written bundles (``.provision-tmp/``) are removed: their certificate never left the
  factory;
- a truncated last manifest line is dropped and re-derived from its bundle.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import multiprocessing
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory.batch import DeviceSpec, counted_devices
from factory.bundle import (
    SharedCAFiles,
    clear_temp_bundles,
    read_bundle,
    write_bundle,
)
from factory.ca import CertificateAuthority
from factory.errors import ProvisionError
from factory.manifest import Manifest, ManifestRecord, ManifestWriter
from factory.signer import KeySource
from fleetcore.bundle_format import bundle_info
from fleetcore.clock import utcnow
from fleetcore.errors import IdentityError
from fleetcore.keys import KEY_ALGORITHMS, private_key_pem
from fleetcore.layout import DataLayout
from fleetcore.profile import (
    CLOCK_SKEW,
    Identity,
    IdentityKind,
    new_serial,
    read_identity,
    serial_hex,
)
from fleetcore.stagger import stagger_fraction
from fleetcore.validity import new_validity

__all__ = [
    "DEFAULT_LIFETIME",
    "DEFAULT_STAGGER",
    "ProvisionLock",
    "ProvisionSummary",
    "Registrar",
    "provision_batch",
]

log = logging.getLogger(__name__)

DEFAULT_LIFETIME = dt.timedelta(days=365)
DEFAULT_STAGGER = dt.timedelta(days=90)
_IN_PROCESS_LIMIT = 400  # below this many devices to mint, a process pool costs more than it saves

ProgressCallback = Callable[[int, int], None]


class Registrar(Protocol):
    """Receives every manifest record of the batch, in order (see factory.registration)."""

    def add(self, record: ManifestRecord) -> None: ...

    def flush(self) -> None: ...


@dataclass
class ProvisionSummary:
    """What a provisioning run did."""

    batch_id: str
    data_dir: str
    requested: int = 0
    issued: int = 0
    recovered: int = 0
    skipped: int = 0
    missing_bundles: int = 0
    registered: bool = False
    temp_bundles_removed: int = 0
    manifest_bytes_repaired: int = 0
    elapsed_s: float = 0.0
    first_device_id: str | None = None
    last_device_id: str | None = None
    device_ids: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Devices minted per second (new certificates only)."""
        return self.issued / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self, *, with_ids: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "batch_id": self.batch_id,
            "data_dir": self.data_dir,
            "requested": self.requested,
            "issued": self.issued,
            "recovered": self.recovered,
            "skipped": self.skipped,
            "missing_bundles": self.missing_bundles,
            "registered": self.registered,
            "temp_bundles_removed": self.temp_bundles_removed,
            "manifest_bytes_repaired": self.manifest_bytes_repaired,
            "elapsed_s": round(self.elapsed_s, 3),
            "devices_per_s": round(self.rate, 1),
            "first_device_id": self.first_device_id,
            "last_device_id": self.last_device_id,
        }
        if with_ids:
            body["device_ids"] = list(self.device_ids)
        return body


# -- the minting worker -------------------------------------------------------------------


@dataclass(frozen=True)
class _WorkerConfig:
    """Everything a minting process needs; pickled once per worker."""

    data_dir: str
    trust_domain: str
    root_pem: bytes
    issuing_pem: bytes
    issuing_key: KeySource
    broker: str
    key_algorithm: str
    batch_start: dt.datetime
    lifetime: dt.timedelta
    stagger: dt.timedelta
    batch_id: str
    publish_url: str | None = None


#: One device for a worker: rank, device id, hardware serial, and whether its bundle folder
#: already exists (a killed run's bundle without a manifest line: recovered, not minted).
_ChunkItem = tuple[int, str, str | None, bool]


@dataclass(frozen=True, slots=True)
class _ChunkTimes:
    """The issue time every device of one chunk shares."""

    issued_at: dt.datetime
    issued_at_iso: str


@dataclass
class _ChunkResult:
    lines: bytes
    issued: int
    recovered: int
    records: list[ManifestRecord] | None


class _Minter:
    """Mints the devices of one chunk; one instance per worker process."""

    def __init__(self, config: _WorkerConfig) -> None:
        layout = DataLayout(Path(config.data_dir))
        self.config = config
        self.ca = CertificateAuthority(
            layout=layout,
            trust_domain=config.trust_domain,
            root_cert=x509.load_pem_x509_certificate(config.root_pem),
            issuing_cert=x509.load_pem_x509_certificate(config.issuing_pem),
            issuing_key=config.issuing_key.open(),
            publish_url=config.publish_url,
        )
        self.devices_dir = str(layout.devices_dir)
        self.temp_dir = str(layout.provision_tmp_dir)
        self.ca_files = SharedCAFiles(
            self.temp_dir, chain_pem=self.ca.chain_pem, root_pem=config.root_pem
        )

    def mint_chunk(self, chunk: list[_ChunkItem], want_records: bool) -> _ChunkResult:
        now = utcnow()
        times = _ChunkTimes(now, now.isoformat())
        lines: list[bytes] = []
        records: list[ManifestRecord] = []
        issued = recovered = 0
        for rank, device_id, hardware_serial, exists in chunk:
            if exists:
                record = self._recover(
                    Path(f"{self.devices_dir}/{device_id}"), device_id, hardware_serial
                )
                recovered += 1
            else:
                record = self._mint(rank, device_id, hardware_serial, times)
                issued += 1
            lines.append(record.to_line())
            if want_records:
                records.append(record)
        return _ChunkResult(b"".join(lines), issued, recovered, records if want_records else None)

    def _mint(
        self, rank: int, device_id: str, hardware_serial: str | None, times: _ChunkTimes
    ) -> ManifestRecord:
        config = self.config
        identity = Identity(config.trust_domain, IdentityKind.DEVICE, device_id)
        serial = new_serial()
        validity = new_validity(
            times.issued_at,
            config.lifetime,
            stagger=config.stagger,
            fraction=stagger_fraction(rank),
            expiry_base=config.batch_start,
        )
        issued = self.ca.issue_client(
            identity,
            not_before=validity.not_before,
            not_after=validity.not_after,
            serial=serial,
            key_algorithm=config.key_algorithm,
        )
        assert issued.private_key is not None
        certificate_pem = issued.certificate_pem
        serial_text = serial_hex(serial)
        # The manifest and device.json say what the certificate holds (whole seconds).
        not_before_iso = validity.not_before.isoformat()
        not_after_iso = validity.not_after.isoformat()
        try:
            write_bundle(
                f"{self.temp_dir}/{device_id}",
                f"{self.devices_dir}/{device_id}",
                certificate_pem=certificate_pem,
                key_pem=private_key_pem(issued.private_key),
                ca_files=self.ca_files,
                info_json=bundle_info(
                    device_id=device_id,
                    hardware_serial=hardware_serial,
                    serial=serial_text,
                    identity=identity.uri,
                    trust_domain=config.trust_domain,
                    not_before=not_before_iso,
                    not_after=not_after_iso,
                    broker=config.broker,
                ),
            )
        except OSError as exc:
            raise ProvisionError(
                f"cannot write the bundle of {device_id} under {self.devices_dir}: "
                f"{exc.strerror or exc}; fix that and run the same command again, the batch "
                "resumes where it stopped"
            ) from None
        return ManifestRecord(
            device_id=device_id,
            hardware_serial=hardware_serial,
            serial=serial_text,
            not_before=not_before_iso,
            not_after=not_after_iso,
            issued_at=times.issued_at_iso,
            certificate_pem=certificate_pem.decode(),
            batch_id=config.batch_id,
        )

    def _recover(
        self, final_dir: Path, device_id: str, hardware_serial: str | None
    ) -> ManifestRecord:
        """A bundle that exists without a manifest line: its certificate goes into the line."""
        contents = read_bundle(final_dir)
        try:
            identity = read_identity(contents.certificate)
        except IdentityError as exc:
            raise ProvisionError(f"bundle {final_dir} holds no device identity: {exc}") from None
        expected = Identity(self.config.trust_domain, IdentityKind.DEVICE, device_id)
        if identity != expected:
            raise ProvisionError(
                f"bundle {final_dir} belongs to {identity.uri}, not {expected.uri}: "
                "move it away and run again"
            )
        bundle_serial = contents.info.get("hardware_serial")
        if hardware_serial is not None and bundle_serial not in (None, hardware_serial):
            raise ProvisionError(
                f"bundle {final_dir} was made for hardware serial {bundle_serial!r}, "
                f"the input says {hardware_serial!r}"
            )
        log.info("manifest line recovered from bundle device_id=%s", device_id)
        return ManifestRecord.from_certificate(
            contents.certificate,
            device_id=device_id,
            hardware_serial=hardware_serial if hardware_serial is not None else bundle_serial,
            issued_at=contents.certificate.not_valid_before_utc + CLOCK_SKEW,
            batch_id=self.config.batch_id,
        )


_worker_minter: _Minter | None = None


def _init_worker(config: _WorkerConfig) -> None:
    global _worker_minter
    _worker_minter = _Minter(config)


def _mint_in_worker(chunk: list[_ChunkItem], want_records: bool) -> _ChunkResult:
    assert _worker_minter is not None, "worker not initialised"
    return _worker_minter.mint_chunk(chunk, want_records)


# -- the batch ----------------------------------------------------------------------------


class ProvisionLock:
    """One provisioning run per data folder (flock on ``.provision.lock``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> ProvisionLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ProvisionError(
                f"another provisioning run is using {self.path.parent} (lock {self.path}); "
                "wait for it to finish"
            ) from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def new_batch_id() -> str:
    return f"b{utcnow():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _chunks(items: Iterator[_ChunkItem], size: int) -> Iterator[list[_ChunkItem]]:
    while chunk := list(islice(items, size)):
        yield chunk


@dataclass(frozen=True)
class _Devices:
    """The batch's devices, iterable more than once: a count (``<prefix>-000001`` ..) or the
    DeviceSpecs read from a serials CSV."""

    total: int
    listed: list[DeviceSpec] | None
    prefix: str

    @classmethod
    def of(cls, devices: Iterable[DeviceSpec] | int, prefix: str) -> _Devices:
        if isinstance(devices, int):
            counted_devices(devices, prefix)  # refuses a bad count or prefix now
            return cls(devices, None, prefix)
        listed = devices if isinstance(devices, list) else list(devices)
        if not listed:
            raise ProvisionError("the batch has no devices")
        return cls(len(listed), listed, prefix)

    def __iter__(self) -> Iterator[DeviceSpec]:
        if self.listed is not None:
            return iter(self.listed)
        return counted_devices(self.total, self.prefix)


def _check_options(
    key_algorithm: str, lifetime: dt.timedelta, stagger: dt.timedelta, chunk_size: int
) -> None:
    if key_algorithm not in KEY_ALGORITHMS:
        raise ProvisionError(
            f"key algorithm {key_algorithm!r} is not one of {', '.join(KEY_ALGORITHMS)}"
        )
    if lifetime <= dt.timedelta(0):
        raise ProvisionError("lifetime must be longer than zero")
    if stagger < dt.timedelta(0):
        raise ProvisionError("stagger window cannot be negative")
    if chunk_size < 1:
        raise ProvisionError(f"chunk size must be at least 1 (got {chunk_size})")


class _BatchRun:
    """One provisioning run, under the data folder's lock.

    :meth:`prepare` repairs the manifest and reads what it already holds; :meth:`scan` counts
    the devices this run skips (already issued) once, before minting; :meth:`pending` then
    yields, lazily, the devices to mint or recover; :meth:`take` writes each finished chunk
    and counts it; :meth:`finish` registers what was skipped and cleans up.
    """

    def __init__(
        self,
        layout: DataLayout,
        devices: _Devices,
        summary: ProvisionSummary,
        *,
        registrar: Registrar | None,
        on_progress: ProgressCallback | None,
        keep_ids: bool,
    ) -> None:
        self.layout = layout
        self.devices = devices
        self.summary = summary
        self.registrar = registrar
        self.on_progress = on_progress
        self.keep_ids = keep_ids
        self.manifest = Manifest(layout.manifest)
        self.done = 0
        self.issued_ids: set[str] = set()
        self.existing_bundles: set[str] = set()
        self.skipped_ids: set[str] = set()

    def prepare(self) -> None:
        layout, summary = self.layout, self.summary
        summary.manifest_bytes_repaired = self.manifest.repair()
        summary.temp_bundles_removed = clear_temp_bundles(layout.provision_tmp_dir)
        layout.provision_tmp_dir.mkdir(parents=True, exist_ok=True)
        layout.devices_dir.mkdir(parents=True, exist_ok=True)
        self.issued_ids, device_by_hardware = _index_manifest(self.manifest)
        # One listing instead of a lookup per device: only this run (it holds the lock) adds
        # bundles, and renaming onto a finished bundle fails (ENOTEMPTY), never replaces it.
        # Kept: bundles without a manifest line (a killed run's), the only ones asked about.
        self.existing_bundles = {
            name for name in os.listdir(layout.devices_dir) if name not in self.issued_ids
        }
        if self.devices.listed is not None:  # serials input: refuse before minting anything
            _refuse_rebound_hardware(self.devices.listed, device_by_hardware)

    def scan(self) -> None:
        """Record the batch's ids and count the devices already issued (skipped)."""
        summary = self.summary
        for spec in self.devices:
            if self.keep_ids:
                summary.device_ids.append(spec.device_id)
            if summary.first_device_id is None:
                summary.first_device_id = spec.device_id
            summary.last_device_id = spec.device_id
            if spec.device_id in self.issued_ids:
                self._skip(spec.device_id)
        self._progress()

    def _skip(self, device_id: str) -> None:
        self.summary.skipped += 1
        self.done += 1
        if not self.layout.device_dir(device_id).exists():
            self.summary.missing_bundles += 1
            log.warning(
                "bundle missing for an issued device, not re-issuing device_id=%s", device_id
            )
        if self.registrar is not None:
            self.skipped_ids.add(device_id)

    def pending(self) -> Iterator[_ChunkItem]:
        """The devices to mint (or to recover from their bundle), in batch order."""
        for spec in self.devices:
            if spec.device_id not in self.issued_ids:
                yield (
                    spec.rank,
                    spec.device_id,
                    spec.hardware_serial,
                    spec.device_id in self.existing_bundles,
                )

    def take(self, writer: ManifestWriter, result: _ChunkResult) -> None:
        """Write one finished chunk's manifest lines (and register them), then count it."""
        writer.append(result.lines)
        self.summary.issued += result.issued
        self.summary.recovered += result.recovered
        self.done += result.issued + result.recovered
        if self.registrar is not None and result.records is not None:
            writer.sync()  # the registry never knows a certificate the manifest lacks
            for record in result.records:
                self.registrar.add(record)
        self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.done, self.summary.requested)

    def finish(self) -> None:
        """Report the final progress, register the skipped devices' lines too, then remove
        the temporary folder."""
        self._progress()
        if self.registrar is not None:
            if self.skipped_ids:
                for record in self.manifest.records():
                    if record.device_id in self.skipped_ids:
                        self.registrar.add(record)
            self.registrar.flush()
            self.summary.registered = True
        clear_temp_bundles(self.layout.provision_tmp_dir)  # the workers' shared CA file pairs
        self.layout.provision_tmp_dir.rmdir()


def _worker_config(
    ca: CertificateAuthority,
    *,
    broker: str,
    key_algorithm: str,
    lifetime: dt.timedelta,
    stagger: dt.timedelta,
    batch_id: str,
) -> _WorkerConfig:
    return _WorkerConfig(
        data_dir=str(ca.layout.root),
        trust_domain=ca.trust_domain,
        root_pem=ca.root_pem,
        issuing_pem=ca.issuing_cert.public_bytes(serialization.Encoding.PEM),
        issuing_key=ca.issuing_source,
        broker=broker,
        key_algorithm=key_algorithm,
        batch_start=utcnow(),
        lifetime=lifetime,
        stagger=stagger,
        batch_id=batch_id,
        publish_url=ca.publish_url,
    )


def provision_batch(
    ca: CertificateAuthority,
    devices: Iterable[DeviceSpec] | int,
    *,
    prefix: str = "dev",
    lifetime: dt.timedelta = DEFAULT_LIFETIME,
    stagger: dt.timedelta = DEFAULT_STAGGER,
    broker: str = "127.0.0.1:8883",
    key_algorithm: str = "p256",
    workers: int = 0,
    chunk_size: int = 250,
    batch_id: str | None = None,
    registrar: Registrar | None = None,
    on_progress: ProgressCallback | None = None,
    keep_ids: bool = True,
    fsync_interval_s: float = 1.0,
) -> ProvisionSummary:
    """Provision ``devices`` (a count, or DeviceSpecs from ``read_serials_csv``).

    Returns a summary; re-running with the same input resumes a killed run (module doc).
    Manifest lines are written as each chunk finishes and fsync'd in groups at most
    ``fsync_interval_s`` apart (0: after every chunk), and always before returning.
    Raises ProvisionError for refused input, CAError when the CA cannot sign.
    """
    _check_options(key_algorithm, lifetime, stagger, chunk_size)
    batch = _Devices.of(devices, prefix)
    worker_count = workers or os.cpu_count() or 1
    layout = ca.layout
    summary = ProvisionSummary(
        batch_id=batch_id or new_batch_id(), data_dir=str(layout.root), requested=batch.total
    )
    started = time.perf_counter()
    with ProvisionLock(layout.provision_lock):
        run = _BatchRun(
            layout, batch, summary, registrar=registrar, on_progress=on_progress, keep_ids=keep_ids
        )
        run.prepare()
        run.scan()
        config = _worker_config(
            ca,
            broker=broker,
            key_algorithm=key_algorithm,
            lifetime=lifetime,
            stagger=stagger,
            batch_id=summary.batch_id,
        )
        want_records = registrar is not None
        log.info(
            "provisioning started batch_id=%s devices=%d already_issued=%d workers=%d",
            summary.batch_id,
            batch.total,
            len(run.issued_ids),
            worker_count,
        )
        with run.manifest.writer(fsync_interval_s=fsync_interval_s) as writer:
            chunks = _chunks(run.pending(), chunk_size)
            to_mint = batch.total - summary.skipped
            if worker_count <= 1 or to_mint <= _IN_PROCESS_LIMIT:
                minter = _Minter(config)
                for chunk in chunks:
                    run.take(writer, minter.mint_chunk(chunk, want_records))
            else:
                _run_pool(config, chunks, worker_count, want_records, partial(run.take, writer))
        run.finish()
    summary.elapsed_s = time.perf_counter() - started
    log.info(
        "provisioning finished batch_id=%s issued=%d recovered=%d skipped=%d elapsed_s=%.2f "
        "devices_per_s=%.0f",
        summary.batch_id,
        summary.issued,
        summary.recovered,
        summary.skipped,
        summary.elapsed_s,
        summary.rate,
    )
    return summary


def _run_pool(
    config: _WorkerConfig,
    chunks: Iterator[list[_ChunkItem]],
    worker_count: int,
    want_records: bool,
    handle: Callable[[_ChunkResult], None],
) -> None:
    """Keep at most ``3 * worker_count`` chunks in flight; handle results in batch order."""
    context = multiprocessing.get_context("forkserver")
    in_flight: deque[Future[_ChunkResult]] = deque()
    limit = worker_count * 3
    with ProcessPoolExecutor(
        max_workers=worker_count,
        mp_context=context,
        initializer=_init_worker,
        initargs=(config,),
    ) as pool:
        try:
            for chunk in chunks:
                in_flight.append(pool.submit(_mint_in_worker, chunk, want_records))
                if len(in_flight) >= limit:
                    handle(in_flight.popleft().result())
            while in_flight:
                handle(in_flight.popleft().result())
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise


def _refuse_rebound_hardware(specs: list[DeviceSpec], device_by_hardware: dict[str, str]) -> None:
    for spec in specs:
        if spec.hardware_serial is None:
            continue
        owner = device_by_hardware.get(spec.hardware_serial)
        if owner is not None and owner != spec.device_id:
            raise ProvisionError(
                f"hardware serial {spec.hardware_serial!r} was already issued to device "
                f"{owner!r} (manifest); one board, one identity"
            )


def _index_manifest(manifest: Manifest) -> tuple[set[str], dict[str, str]]:
    """Device ids already in the manifest, and hardware serial -> device id."""
    issued: set[str] = set()
    by_hardware: dict[str, str] = {}
    for record in manifest.records():
        if record.device_id in issued:
            log.warning("manifest lists a device twice device_id=%s", record.device_id)
        issued.add(record.device_id)
        if record.hardware_serial:
            by_hardware[record.hardware_serial] = record.device_id
    return issued, by_hardware


def summary_json(summary: ProvisionSummary) -> str:
    return json.dumps(summary.as_dict(), indent=2)
