"""Loading the factory's manifest.jsonl into the registry (idempotent)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

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

__all__ = ["import_manifest", "read_manifest"]

log = logging.getLogger(__name__)


def read_manifest(path: Path, ca: CertificateAuthority) -> Iterator[devices.Registration]:
    """Parse each manifest line into a registration; raise ConfigError naming the bad line."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pem = record["certificate_pem"]
                hardware_serial = record.get("hardware_serial")
                if not isinstance(pem, str):
                    raise TypeError("certificate_pem is not a string")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{path}:{number}: not a manifest record ({exc})") from None
            try:
                parsed = parse_device_certificate(
                    pem, issuing_cert=ca.trusted_issuer_certs(), trust_domain=ca.trust_domain
                )
            except InvalidCertificateError as exc:
                raise ConfigError(f"{path}:{number}: {exc}") from None
            yield devices.Registration(parsed, hardware_serial or None)


def import_manifest(settings: RegistrySettings, path: Path, *, who: str) -> BatchResult:
    """Register every certificate in ``path``, in batches of 1000; returns the totals."""
    ca = CertificateAuthority.load(settings.layout, passphrase=settings.ca_passphrase_bytes)
    engine = make_engine(settings)
    actor = audit.Actor(who=who, from_addr="local")
    created = existing = 0
    try:
        migrate(engine)
        batch: list[devices.Registration] = []
        registrations = read_manifest(path, ca)
        while True:
            batch.clear()
            for registration in registrations:
                batch.append(registration)
                if len(batch) == MAX_BATCH:
                    break
            if not batch:
                break
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
