"""Revocation costs against fleet size (issue 23): one fleet size, one backend, one JSON line.

    flock /tmp/certfleet-cpu.lock .venv/bin/python -m bench.bench_fleet_scale \
        --devices 100000 --backend sqlite|postgres --json

Fills a fresh database with ``bench/fleet_generator.py`` (pool certificates), then measures
in this process, through the registry's own code:

- ``crl_full_sign_s``: signing the base CRL (every revoked certificate still valid) with
  ``factory.crl.build_crl``, DER included; ``crl_full_read_s``: reading its entries
  (``store.certificates.crl_contents``); ``crl_bytes``: its DER size;
  ``crl_full_sign_before_s``: the same entries signed the way ``build_crl`` did before issue
  23 (one ``add_revoked_certificate`` per entry), only while that takes under a minute;
- ``crl_delta_sign_ms``: CPU of one decommission's delta CRL (read its entries since the
  base, allocate its number, sign), median of ``--changes`` decommissions in a row, and
  ``crl_delta_sign_max_ms`` the largest;
- ``ocsp_p99_ms``: the OCSP responder's ``respond`` (parse, status from the database, sign)
  for random serials of the fleet, in process, no HTTP.

Only what was measured is printed; nothing is a placeholder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlmodel import Session, col, select

from bench.fleet_generator import FleetSpec, generate_fleet
from factory.ca import CertificateAuthority
from factory.crl import RevokedEntry
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout
from registry.db import make_engine
from registry.models import Certificate
from registry.ocsp import OcspResponder
from registry.settings import RegistrySettings
from registry.store import certificates
from registry.store.audit import Actor
from registry.store.revocations import decommission_device

POSTGRES_ADMIN = os.environ.get(
    "CERTFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: the quadratic builder is only run while its entries take under about a minute
BEFORE_MAX_ENTRIES = 70_000
NEXT_UPDATE = dt.timedelta(hours=24)


def sign_before(ca: CertificateAuthority, entries: list[RevokedEntry]) -> float:
    """The pre-issue-23 build_crl: one immutable-builder copy per entry (quadratic)."""
    started = time.perf_counter()
    now = utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.issuing_cert.subject)
        .last_update(now)
        .next_update(now + NEXT_UPDATE)
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .add_extension(x509.CRLReason(entry.reason), critical=False)
            .build()
        )
    builder.sign(ca.issuing_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    return time.perf_counter() - started


def measure_crl(ca: CertificateAuthority, engine: Any, changes: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    started = time.perf_counter()
    with Session(engine) as session:
        contents = certificates.crl_contents(session, utcnow())
    result["crl_full_read_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    base = ca.build_crl(contents.entries, crl_number=contents.crl_number)
    der = base.public_bytes(serialization.Encoding.DER)
    result["crl_full_sign_s"] = round(time.perf_counter() - started, 3)
    result["crl_bytes"] = len(der)
    if len(contents.entries) <= BEFORE_MAX_ENTRIES:
        result["crl_full_sign_before_s"] = round(sign_before(ca, contents.entries), 3)
    with Session(engine) as session:
        active = session.exec(
            select(Certificate.device_id)
            .where(Certificate.status == "live")
            .order_by(col(Certificate.serial))
            .limit(changes)
        ).all()
    cpu_ms = []
    for device_id in active:
        with Session(engine) as session:
            decommission_device(session, device_id, "bench", Actor("spiffe://bench"))
        started = time.process_time()
        with Session(engine) as session:
            delta = certificates.delta_contents(session, utcnow(), contents.head_seq)
        ca.build_crl(
            delta.entries, crl_number=delta.crl_number, delta_of=contents.crl_number
        ).public_bytes(serialization.Encoding.DER)
        cpu_ms.append((time.process_time() - started) * 1000)
    result["crl_delta_sign_ms"] = round(statistics.median(cpu_ms), 2)
    result["crl_delta_sign_max_ms"] = round(max(cpu_ms), 2)
    result["crl_delta_entries"] = len(delta.entries)
    return result


def measure_ocsp(ca: CertificateAuthority, engine: Any, serials: list[int], n: int) -> float:
    responder = OcspResponder(ca, engine, answer_validity=dt.timedelta(hours=1))
    name_hash = _sha1(ca.issuing_cert.subject.public_bytes())
    key_bits = ca.issuing_cert.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key_hash = _sha1(key_bits)
    rng = random.Random(7)
    latencies = []
    for _ in range(n):
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(name_hash, key_hash, rng.choice(serials), hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        started = time.perf_counter()
        answer = ocsp.load_der_ocsp_response(responder.respond(request))
        latencies.append((time.perf_counter() - started) * 1000)
        assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return round(statistics.quantiles(latencies, n=100)[98], 2)


def _sha1(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA1())  # noqa: S303 - OCSP CertID, what OpenSSL sends
    digest.update(data)
    return digest.finalize()


def run(devices: int, backend: str, changes: int, ocsp_requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="certfleet-scale-") as tmp:
        layout = DataLayout(Path(tmp) / "data")
        ca = CertificateAuthority.init(layout, "fleet.scale", publish_url="http://127.0.0.1:9")
        database = f"certfleet_scale_{uuid.uuid4().hex[:8]}"
        if backend == "postgres":
            import psycopg

            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{database}"')
            url = f"{POSTGRES_ADMIN.rsplit('/', 1)[0]}/{database}"
        else:
            url = f"sqlite:///{Path(tmp) / 'registry.db'}"
        try:
            fleet = generate_fleet(ca, url, FleetSpec(devices))
            result: dict[str, Any] = {
                "devices": devices,
                "backend": backend,
                "revoked": len(fleet.revoked_serials),
                "generate_s": round(fleet.seconds, 1),
            }
            engine = make_engine(RegistrySettings(data_dir=layout.root, registry_database_url=url))
            try:
                result.update(measure_crl(ca, engine, changes))
                if ocsp_requests:
                    with Session(engine) as session:
                        sample = session.exec(
                            select(Certificate.serial).limit(20_000)
                        ).all()
                    serials = [int(s, 16) for s in sample]
                    result["ocsp_p99_ms"] = measure_ocsp(ca, engine, serials, ocsp_requests)
            finally:
                engine.dispose()
            return result
        finally:
            if backend == "postgres":
                import psycopg

                with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--changes", type=int, default=20, help="decommissions, one delta each")
    parser.add_argument("--ocsp-requests", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    result = run(args.devices, args.backend, args.changes, args.ocsp_requests)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
