"""Expiry gauges and report at fleet scale: the cost of one /metrics scrape's expiry query
(``registry.store.expiry.expiry_counts``), of ``GET /api/v1/expiry`` (``expiry_report``) and of the
supersede worker's due-query, on SQLite and (when reachable) PostgreSQL.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_expiry.py [--devices 100000]

Seeds ``--devices`` active devices with one live certificate each (not_after spread over a
year), a fifth of them renewed (a second, later live certificate, the older one scheduled
for supersession), and 1% decommissioned; then times each query ``--repeat`` times.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_registry import percentile, scratch_postgres  # noqa: E402

from fleetcore.clock import utcnow  # noqa: E402
from registry.db import make_engine, migrate  # noqa: E402
from registry.models import Certificate, Device  # noqa: E402
from registry.settings import RegistrySettings  # noqa: E402
from registry.store.expiry import expiry_counts, expiry_report  # noqa: E402
from registry.store.supersede import next_supersede_due  # noqa: E402

CHUNK = 10_000


def _certificate(device_id: str, not_after: dt.datetime, **extra: Any) -> dict[str, Any]:
    return {
        "serial": secrets.token_hex(16),
        "device_id": device_id,
        "not_before": not_after - dt.timedelta(days=365),
        "not_after": not_after,
        "status": "live",
        "revoked_at": None,
        "certificate_pem": "(seeded by bench_expiry)",
        "supersede_at": None,
        **extra,
    }


def seed(engine: Engine, devices: int) -> float:
    """Fill the database; returns the seconds it took."""
    now = utcnow()
    started = time.perf_counter()
    with engine.begin() as connection:
        for start in range(0, devices, CHUNK):
            ids = [f"bench-{i:07d}" for i in range(start, min(start + CHUNK, devices))]
            connection.execute(
                Device.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {"device_id": d, "status": "active", "created_at": now}
                    for d in ids
                ],
            )
            rows = []
            for i, device_id in enumerate(ids, start):
                not_after = now + dt.timedelta(days=i % 365, seconds=i) - dt.timedelta(days=3)
                renewed = i % 5 == 0
                rows.append(
                    _certificate(
                        device_id,
                        not_after,
                        supersede_at=now + dt.timedelta(hours=1) if renewed else None,
                    )
                )
                if renewed:
                    rows.append(_certificate(device_id, not_after + dt.timedelta(days=365)))
            connection.execute(Certificate.__table__.insert(), rows)  # type: ignore[attr-defined]
        table = Device.__table__  # type: ignore[attr-defined]
        connection.execute(
            update(table)
            .where(table.c.device_id.in_([f"bench-{i:07d}" for i in range(0, devices, 100)]))
            .values(status="decommissioned", decommissioned_at=now)
        )
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


def timed(engine: Engine, query: Callable[[Session], object], repeat: int) -> dict[str, float]:
    seconds = []
    for _ in range(repeat):
        with Session(engine) as session:
            started = time.perf_counter()
            query(session)
            seconds.append(time.perf_counter() - started)
    return {
        "p50_ms": round(statistics.median(seconds) * 1000, 2),
        "p99_ms": round(percentile(seconds, 99) * 1000, 2),
        "n": len(seconds),
    }


def run(database_url: str, data_dir: Path, devices: int, repeat: int) -> dict[str, Any]:
    engine = make_engine(RegistrySettings(data_dir=data_dir, registry_database_url=database_url))
    try:
        migrate(engine)
        seed_s = seed(engine, devices)
        with Session(engine) as session:
            counts = expiry_counts(session, utcnow())
        return {
            "seed_s": round(seed_s, 1),
            "active_devices": counts.active_devices,
            "within": counts.within,
            "without_valid_certificate": counts.without_valid_certificate,
            "scrape_expiry_counts": timed(engine, lambda s: expiry_counts(s, utcnow()), repeat),
            "expiry_report": timed(engine, lambda s: expiry_report(s, utcnow()), repeat),
            "supersede_next_due": timed(engine, next_supersede_due, repeat),
        }
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"devices": args.devices}
    with tempfile.TemporaryDirectory() as scratch:
        if not args.skip_sqlite:
            results["sqlite"] = run(
                f"sqlite:///{scratch}/registry.db", Path(scratch), args.devices, args.repeat
            )
        with scratch_postgres() as url:
            if url is not None:
                results["postgresql"] = run(url, Path(scratch), args.devices, args.repeat)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
