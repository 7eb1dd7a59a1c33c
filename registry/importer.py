"""Loading the factory's manifest.jsonl into the registry (idempotent).

Each line's certificate is parsed and its issuing signature checked (about 0.4 ms of CPU a
line, most of an import's cost). A large manifest is parsed by one worker process per core,
a batch of lines each, in order, while this process writes the batches already parsed: a
million lines is a few minutes, not the quarter of an hour one core took.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import Session

from factory.ca import CertificateAuthority
from fleetcore.errors import ConfigError
from registry.certs import parse_device_certificate
from registry.db import make_engine, migrate
from registry.errors import InvalidCertificateError
from registry.models import MAX_BATCH, BatchResult
from registry.planner import analyze
from registry.settings import RegistrySettings
from registry.store import audit, devices

__all__ = ["PARALLEL_MIN_BYTES", "import_manifest", "read_manifest"]

log = logging.getLogger(__name__)

#: manifests at least this large (about 4,000 lines) are parsed by worker processes
PARALLEL_MIN_BYTES = 4 * 1024 * 1024

#: a worker's issuing certificate and trust domain (set by :func:`_start_worker`)
_worker_issuer: tuple[list[x509.Certificate], str] | None = None


def _parse_line(
    path: Path,
    number: int,
    line: str,
    issuers: Sequence[x509.Certificate],
    trust_domain: str,
) -> devices.Registration:
    """One manifest record as a registration; raise ConfigError naming the bad line."""
    try:
        record = json.loads(line)
        pem = record["certificate_pem"]
        hardware_serial = record.get("hardware_serial")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}:{number}: not a manifest record ({exc})") from None
    if not isinstance(pem, str):
        raise ConfigError(
            f"{path}:{number}: not a manifest record (certificate_pem is not a string)"
        )
    try:
        parsed = parse_device_certificate(pem, issuing_cert=issuers, trust_domain=trust_domain)
    except InvalidCertificateError as exc:
        raise ConfigError(f"{path}:{number}: {exc}") from None
    return devices.Registration(parsed, hardware_serial or None)


def _numbered_lines(path: Path) -> Iterator[list[tuple[int, str]]]:
    """The manifest's non-blank lines with their numbers, in chunks of up to MAX_BATCH."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from None
    with handle:
        chunk: list[tuple[int, str]] = []
        for number, line in enumerate(handle, start=1):
            if line.strip():
                chunk.append((number, line))
                if len(chunk) == MAX_BATCH:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def read_manifest(path: Path, ca: CertificateAuthority) -> Iterator[devices.Registration]:
    """Parse each manifest line into a registration; raise ConfigError naming the bad line."""
    for chunk in _numbered_lines(path):
        for number, line in chunk:
            yield _parse_line(path, number, line, ca.trusted_issuer_certs(), ca.trust_domain)


def _start_worker(issuers_pem: bytes, trust_domain: str) -> None:
    global _worker_issuer
    _worker_issuer = (x509.load_pem_x509_certificates(issuers_pem), trust_domain)


def _parse_chunk(path: Path, chunk: list[tuple[int, str]]) -> list[devices.Registration]:
    assert _worker_issuer is not None, "worker started without _start_worker"
    issuers, trust_domain = _worker_issuer
    return [_parse_line(path, n, line, issuers, trust_domain) for n, line in chunk]


def _batches(path: Path, ca: CertificateAuthority) -> Iterator[list[devices.Registration]]:
    """Batches of up to MAX_BATCH registrations, in manifest order."""
    try:
        large = path.stat().st_size >= PARALLEL_MIN_BYTES
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from None
    workers = os.cpu_count() or 1
    issuers = ca.trusted_issuer_certs()
    if not large or workers < 2:
        for chunk in _numbered_lines(path):
            yield [_parse_line(path, n, line, issuers, ca.trust_domain) for n, line in chunk]
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded caller
        initializer=_start_worker,
        initargs=(b"".join(c.public_bytes(Encoding.PEM) for c in issuers), ca.trust_domain),
    )
    try:
        pending: deque[Future[list[devices.Registration]]] = deque()
        for chunk in _numbered_lines(path):
            pending.append(pool.submit(_parse_chunk, path, chunk))
            if len(pending) > 2 * workers:  # bounded read-ahead: memory stays flat
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def import_manifest(settings: RegistrySettings, path: Path, *, who: str) -> BatchResult:
    """Register every certificate in ``path``, in batches of 1000; returns the totals.

    The batches before a bad line are registered; the bad line's batch and those after
    are not (the ConfigError names the line).
    """
    ca = CertificateAuthority.load(settings.layout, passphrase=settings.ca_passphrase_bytes)
    engine = make_engine(settings)
    actor = audit.Actor(who=who, from_addr="local")
    created = existing = 0
    try:
        migrate(engine)
        for batch in _batches(path, ca):
            with Session(engine) as session:
                result = devices.register_devices(session, batch, actor)
            created += result.created
            existing += result.existing
        if created:
            analyze(engine)
    finally:
        engine.dispose()
    log.info("manifest imported path=%s created=%d existing=%d", path, created, existing)
    return BatchResult(created=created, existing=existing)
