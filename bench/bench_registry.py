"""Registry benchmark: batch registration rate, read latency at 100k devices, revocation
propagation through the long-poll feed. SQLite and (when reachable) PostgreSQL.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_registry.py [--devices 100000]

The registry runs as its own process (``certfleet registry serve``, real HTTPS, uvicorn);
this script is the client (httpx, keep-alive). Certificates are minted beforehand, all
sharing one device key (a benchmark-only shortcut: each is still a distinct, CA-signed
leaf with its own serial and identity, and the registry verifies every signature).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

from factory.ca import CertificateAuthority, write_issued
from factory.keys import load_private_key
from fleetcore.cert_builders import build_leaf_certificate
from fleetcore.keys import generate_key, private_key_pem
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from fleetcore.tls import service_client_context

POSTGRES_ADMIN_URL = os.environ.get(
    "CERTFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BATCH = 1000


def _mint_range(data_dir: str, key_pem: bytes, start: int, stop: int) -> list[str]:
    ca = CertificateAuthority.load(DataLayout(Path(data_dir)))
    key = serialization.load_pem_private_key(key_pem, password=None)
    now = dt.datetime.now(dt.UTC)
    pems = []
    for i in range(start, stop):
        # staggered expiry over a year, so list/stats see a realistic spread
        not_after = now + dt.timedelta(days=365 + (i % 365))
        certificate = build_leaf_certificate(
            identity=ca.identity(IdentityKind.DEVICE, f"bench-{i:07d}"),
            public_key=key.public_key(),  # type: ignore[arg-type]
            issuer_cert=ca.issuing_cert,
            issuer_key=ca.issuing_key,
            not_before=now - dt.timedelta(minutes=5),
            not_after=not_after,
        )
        pems.append(certificate.public_bytes(serialization.Encoding.PEM).decode())
    return pems


def mint(data_dir: Path, count: int) -> list[str]:
    key_pem = private_key_pem(generate_key())
    chunk = 5000
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = [
            pool.submit(_mint_range, str(data_dir), key_pem, start, min(start + chunk, count))
            for start in range(0, count, chunk)
        ]
        return [pem for future in futures for pem in future.result()]


@contextmanager
def registry_process(
    data_dir: Path,
    database_url: str | None,
    *,
    extra_env: dict[str, str] | None = None,
    start_timeout: float = 60.0,
    code: Path | None = None,
) -> Iterator[str]:
    """``certfleet registry serve`` as a process; ``code``: the checkout whose registry runs
    (another commit's worktree runs that commit's code; default: this one)."""
    ready = data_dir / "registry.ready"
    ready.unlink(missing_ok=True)
    env = {**os.environ, "CERTFLEET_LOG_LEVEL": "warning", **(extra_env or {})}
    if database_url:
        env["CERTFLEET_REGISTRY_DATABASE_URL"] = database_url
    else:
        env.pop("CERTFLEET_REGISTRY_DATABASE_URL", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "registry",
            "serve",
            "--data-dir",
            str(data_dir),
            "--addr",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        cwd=code,
    )
    try:
        deadline = time.monotonic() + start_timeout
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("registry did not start")
            time.sleep(0.05)
        yield json.loads(ready.read_text())["url"]
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def scratch_postgres() -> Iterator[str | None]:
    """A fresh PostgreSQL database's URL for one benchmark run (dropped afterwards), or None
    (with the reason printed) when no server is reachable."""
    import psycopg

    name = f"certfleet_bench_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        print(f"postgres skipped: {exc}")
        yield None
        return
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def client(url: str, layout: DataLayout) -> httpx.Client:
    context = service_client_context(layout, "bench-op")
    return httpx.Client(base_url=url + "/api/v1", verify=context, timeout=120)


def healthz_probe(url: str, layout: DataLayout, stop: threading.Event, out: list[float]) -> None:
    """GET /healthz every 50 ms until ``stop``; each latency (s) into ``out`` (999 if not 200)."""
    with client(url, layout) as http:
        while not stop.is_set():
            started = time.perf_counter()
            response = http.get("/healthz")
            out.append(time.perf_counter() - started if response.status_code == 200 else 999.0)
            stop.wait(0.05)


def decommission_concurrently(
    url: str, layout: DataLayout, ids: list[str], clients: int
) -> tuple[list[float], Counter[str]]:
    """Decommission ``ids`` from ``clients`` threads, each its own TLS connection; returns
    every call's latency (s) and the count of each status (or exception name)."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(index: int) -> None:
        with client(url, layout) as http:  # its own TLS connection
            for device_id in ids[index::clients]:
                started = time.perf_counter()
                try:
                    status = str(
                        http.post(
                            f"/devices/{device_id}/decommission", json={"reason": "bench burst"}
                        ).status_code
                    )
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    latencies.append(time.perf_counter() - started)
                    statuses[status] += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return latencies, statuses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
        "n": len(values),
    }


def run(
    label: str, url: str, layout: DataLayout, pems: list[str], args: argparse.Namespace
) -> dict[str, object]:
    result: dict[str, object] = {"database": label, "devices": len(pems)}
    batches = [pems[i : i + BATCH] for i in range(0, len(pems), BATCH)]
    clients = [client(url, layout) for _ in range(args.senders)]

    def send(index: int) -> int:
        http = clients[index % len(clients)]
        body = {"devices": [{"certificate_pem": pem} for pem in batches[index]]}
        response = http.post("/devices/batch", json=body)
        response.raise_for_status()
        return int(response.json()["created"])

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.senders) as pool:
        created = sum(pool.map(send, range(len(batches))))
    elapsed = time.perf_counter() - started
    assert created == len(pems), f"created {created} of {len(pems)}"
    result["register_seconds"] = round(elapsed, 2)
    result["register_per_second"] = round(len(pems) / elapsed)
    print(
        f"[{label}] registered {len(pems)} in {elapsed:.1f}s = {len(pems) / elapsed:.0f}/s",
        flush=True,
    )

    http = clients[0]
    rng = random.Random(7)
    for _ in range(20):  # warm-up
        http.get("/devices", params={"limit": 100})
    list_times, get_times = [], []
    for _ in range(args.reads):
        cursor_id = f"bench-{rng.randrange(len(pems)):07d}"
        cursor = base64.urlsafe_b64encode(cursor_id.encode()).decode().rstrip("=")
        t0 = time.perf_counter()
        response = http.get("/devices", params={"limit": 100, "cursor": cursor})
        list_times.append(time.perf_counter() - t0)
        assert response.status_code == 200
        t0 = time.perf_counter()
        response = http.get(f"/devices/bench-{rng.randrange(len(pems)):07d}")
        get_times.append(time.perf_counter() - t0)
        assert response.status_code == 200
    filtered_times = []
    for _ in range(args.reads // 2):
        cursor_id = f"bench-{rng.randrange(len(pems)):07d}"
        cursor = base64.urlsafe_b64encode(cursor_id.encode()).decode().rstrip("=")
        t0 = time.perf_counter()
        response = http.get("/devices", params={"limit": 100, "cursor": cursor, "status": "active"})
        filtered_times.append(time.perf_counter() - t0)
        assert response.status_code == 200
    result["list_page_100_status_active"] = summary_ms(filtered_times)
    result["list_page_100"] = summary_ms(list_times)
    result["get_one"] = summary_ms(get_times)
    print(
        f"[{label}] list {result['list_page_100']} "
        f"list?status=active {result['list_page_100_status_active']} get {result['get_one']}",
        flush=True,
    )

    # decommission -> visible to a long-poll waiter
    waiter_http = client(url, layout)
    head = int(http.get("/revocations", params={"after": 0, "limit": 1}).json()["head_seq"])
    received: dict[str, float] = {}
    stop = threading.Event()

    def follow() -> None:
        after = head
        while not stop.is_set():
            feed = waiter_http.get("/revocations", params={"after": after, "wait": 5}).json()
            now = time.perf_counter()
            for event in feed["events"]:
                received[event["device_id"]] = now
            after = feed["last_seq"]

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    victims = rng.sample(range(len(pems)), args.decommissions)
    sent_at: dict[str, float] = {}
    call_times = []
    time.sleep(0.2)  # let the follower park in its long-poll before the first decommission
    for index in victims:
        device_id = f"bench-{index:07d}"
        sent_at[device_id] = t0 = time.perf_counter()
        response = http.post(f"/devices/{device_id}/decommission", json={"reason": "bench"})
        call_times.append(time.perf_counter() - t0)
        assert response.status_code == 200, response.text
        deadline = time.perf_counter() + 10
        while device_id not in received and time.perf_counter() < deadline:
            time.sleep(0.0005)
    stop.set()
    visible = [received[d] - sent_at[d] for d in sent_at if d in received]
    assert len(visible) == len(sent_at), "some revocations never reached the feed follower"
    result["decommission_call"] = summary_ms(call_times)
    result["decommission_to_feed_visible"] = summary_ms(visible)
    print(
        f"[{label}] decommission call {result['decommission_call']} "
        f"-> feed visible {result['decommission_to_feed_visible']}",
        flush=True,
    )
    follower.join(10)
    for h in [*clients, waiter_http]:
        h.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--reads", type=int, default=1000)
    parser.add_argument("--decommissions", type=int, default=200)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="certfleet-bench-registry-"))
    layout = DataLayout(base)
    ca = CertificateAuthority.init(layout, "bench.test")
    operator = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "bench-op"))
    write_issued(operator, layout.client_cert("bench-op"), layout.client_key("bench-op"))
    load_private_key(layout.client_key("bench-op"))

    t0 = time.perf_counter()
    pems = mint(base, args.devices)
    print(f"minted {len(pems)} certificates in {time.perf_counter() - t0:.1f}s", flush=True)

    results = []
    with registry_process(base, None) as url:
        results.append(run("sqlite", url, layout, pems, args))

    if not args.skip_postgres:
        with scratch_postgres() as pg_url:
            if pg_url is not None:
                with registry_process(base, pg_url) as url:
                    results.append(run("postgresql", url, layout, pems, args))

    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
