"""Console benchmark: server time of every console page at 100,000 devices (target: < 100 ms
each), on SQLite and (when reachable) PostgreSQL.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_console.py [--devices 100000]

The fleet is seeded straight into the database (one executemany per 10,000 rows: devices,
one live certificate each with expiry staggered over a year, last-seen times and telemetry
for half of them, decommissions with their feed rows and audit entries), then analyzed. The
registry runs as its own process (``certfleet registry serve``, real HTTPS); this script
signs in through the sign-in form and reads each page many times. "Server time" is the
registry's own ``Server-Timing: app;dur=`` header (request in to response start, measured by
the console's middleware); the client's wall time is reported beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_registry import percentile, registry_process, scratch_postgres  # noqa: E402

from factory.ca import CertificateAuthority  # noqa: E402
from fleetcore.layout import DataLayout  # noqa: E402
from fleetcore.tls import client_context
from registry.db import make_engine, migrate  # noqa: E402
from registry.models import AuditLog, Certificate, Device  # noqa: E402
from registry.settings import RegistrySettings  # noqa: E402
from registry.store import audit, revocations, tokens

CHUNK = 10_000
TARGET_MS = 100.0
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
TIMING = re.compile(r"app;dur=([\d.]+)")


def seed(database_url: str, data_dir: Path, devices: int, decommissioned: int) -> str:
    """Fill the database; returns an operator token."""
    engine = make_engine(RegistrySettings(data_dir=data_dir, registry_database_url=database_url))
    migrate(engine)
    now = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    with engine.begin() as connection:
        for start in range(0, devices, CHUNK):
            ids = [f"bench-{i:07d}" for i in range(start, min(start + CHUNK, devices))]
            connection.execute(
                Device.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {
                        "device_id": device_id,
                        "status": "active",
                        "hardware_serial": f"HW-{device_id}",
                        "created_at": now,
                        "last_seen_at": now - dt.timedelta(seconds=i % 120) if i % 2 else None,
                        "last_telemetry": {"temp_c": 20 + i % 9, "battery": 0.9} if i % 2 else None,
                        "decommissioned_at": None,
                    }
                    for i, device_id in enumerate(ids, start)
                ],
            )
            connection.execute(
                Certificate.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {
                        "serial": secrets.token_hex(16),
                        "device_id": device_id,
                        "not_before": now - dt.timedelta(days=1),
                        "not_after": now + dt.timedelta(days=1 + i % 365, seconds=i),
                        "status": "live",
                        "revoked_at": None,
                        "certificate_pem": "(seeded by bench_console: pages never parse it)",
                    }
                    for i, device_id in enumerate(ids, start)
                ],
            )
            connection.execute(
                AuditLog.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {
                        "who": "token:operator/bench",
                        "action": "register",
                        "target": f"{len(ids)} devices",
                        "at": now,
                        "from_addr": "127.0.0.1:1",
                        "detail": {"created": len(ids), "existing": 0},
                    }
                ],
            )
    with Session(engine) as session:
        victims = random.Random(7).sample(range(devices), decommissioned)
        for number in victims:
            revocations.decommission_device(
                session, f"bench-{number:07d}", "seeded <b>decommission</b>", audit.Actor("bench")
            )
        token = tokens.create_token(session, "bench", audit.Actor("bench"))
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()
    print(
        f"seeded devices={devices} decommissioned={decommissioned} "
        f"in {time.perf_counter() - started:.1f}s url={database_url.split('@')[-1]}",
        flush=True,
    )
    return token


def sign_in(http: httpx.Client, token: str) -> str:
    form = http.get("/ui/sign-in")
    found = CSRF.search(form.text)
    assert found, "no CSRF token on the sign-in page"
    response = http.post("/ui/sign-in", data={"token": token, "csrf_token": found.group(1)})
    if response.status_code != 303:
        raise RuntimeError(f"sign-in failed: {response.status_code}")
    page = CSRF.search(http.get("/ui/").text)
    assert page
    return page.group(1)


def measure(
    http: httpx.Client, method: str, url: str, data: dict[str, str] | None = None
) -> tuple[float, float, int]:
    started = time.perf_counter()
    response = http.request(method, url, data=data)
    wall = (time.perf_counter() - started) * 1000
    found = TIMING.search(response.headers.get("server-timing", ""))
    if found is None:
        raise RuntimeError(f"{url}: no Server-Timing header (status {response.status_code})")
    return float(found.group(1)), wall, response.status_code


def run(
    label: str, url: str, root: Path, token: str, args: argparse.Namespace
) -> dict[str, object]:
    rng = random.Random(11)
    expiring = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    context = client_context(root)
    with (
        httpx.Client(base_url=url, verify=context, timeout=60) as http,
        httpx.Client(base_url=url, verify=context, timeout=60) as anonymous,
    ):
        csrf = sign_in(http, token)
        middle = http.get(f"/ui/devices?q=bench-{args.devices // 2:07d}")
        assert middle.status_code == 200
        cursor = re.search(r'cursor=([A-Za-z0-9_-]+)"', http.get("/ui/devices").text)
        pages: dict[str, Callable[[], str]] = {
            "fleet": lambda: "/ui/",
            "fleet live part": lambda: "/ui/fleet/live",
            "devices first page": lambda: "/ui/devices",
            "devices next page": lambda: f"/ui/devices?cursor={cursor.group(1) if cursor else ''}",
            "devices by prefix": lambda: (
                f"/ui/devices?q=bench-{rng.randrange(args.devices // 100):05d}"
            ),
            "devices decommissioned": lambda: "/ui/devices?status=decommissioned",
            "devices expiring in 30 days": lambda: f"/ui/devices?expiring_before={expiring}",
            "device": lambda: f"/ui/devices/bench-{rng.randrange(args.devices):07d}",
            "decommission form": lambda: (
                f"/ui/devices/bench-{rng.randrange(args.devices):07d}/decommission"
            ),
            "docs": lambda: "/docs",
        }
        results: dict[str, dict[str, float]] = {}
        for name, client, next_url in [
            ("sign-in", anonymous, lambda: "/ui/sign-in"),  # signed out: the form itself
            *((name, http, next_url) for name, next_url in pages.items()),
        ]:
            for _ in range(3):  # warm-up: connection, template compile, page cache
                measure(client, "GET", next_url())
            server, wall = [], []
            for _ in range(args.reads):
                s, w, status = measure(client, "GET", next_url())
                if status != 200:
                    raise RuntimeError(f"{name}: status {status}")
                server.append(s)
                wall.append(w)
            results[name] = summarize(server, wall)
        server, wall = [], []
        used: set[int] = set()
        for _ in range(args.decommissions):
            number = rng.randrange(args.devices)
            while number in used:
                number = rng.randrange(args.devices)
            used.add(number)
            s, w, status = measure(
                http,
                "POST",
                f"/ui/devices/bench-{number:07d}/decommission",
                {"reason": "bench", "reason_code": "superseded", "csrf_token": csrf},
            )
            if status not in (200, 409):
                raise RuntimeError(f"decommission: status {status}")
            server.append(s)
            wall.append(w)
        results["decommission (POST)"] = summarize(server, wall)
    slowest = max(r["server_p95_ms"] for r in results.values())
    return {
        "database": label,
        "devices": args.devices,
        "pages": results,
        "slowest_server_p95_ms": slowest,
        "under_target": slowest < TARGET_MS,
    }


def summarize(server: list[float], wall: list[float]) -> dict[str, float]:
    return {
        "server_p50_ms": round(statistics.median(server), 2),
        "server_p95_ms": round(percentile(server, 95), 2),
        "server_max_ms": round(max(server), 2),
        "client_p50_ms": round(statistics.median(wall), 2),
        "n": len(server),
    }


def _run_all(base: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    layout = DataLayout(base)
    CertificateAuthority.init(layout, "bench.test")
    results: list[dict[str, object]] = []
    sqlite_url = f"sqlite:///{layout.registry_db.resolve()}"
    token = seed(sqlite_url, base, args.devices, args.decommissioned)
    with registry_process(base, None) as url:
        results.append(run("sqlite", url, layout.root_cert, token, args))

    if not args.skip_postgres:
        with scratch_postgres() as pg_url:
            if pg_url is not None:
                token = seed(pg_url, base, args.devices, args.decommissioned)
                with registry_process(base, pg_url) as url:
                    results.append(run("postgresql", url, layout.root_cert, token, args))

    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--decommissioned", type=int, default=200)
    parser.add_argument("--reads", type=int, default=50, help="requests per page")
    parser.add_argument("--decommissions", type=int, default=20, help="POSTs through the page")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="certfleet-bench-console-"))
    try:
        results = _run_all(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "target_ms": TARGET_MS,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
