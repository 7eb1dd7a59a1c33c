"""Revocation and lifecycle costs against fleet size (issue 23): one size, one backend, one JSON.

    flock /tmp/certfleet-cpu.lock .venv/bin/python -m bench.bench_fleet_scale \
        --devices 100000 --backend sqlite|postgres --json

Fills a fresh database with ``bench/fleet_generator.py`` (N devices, about half with a
superseded certificate still revoked, 3 % decommissioned), registers ``--connected`` extra
devices with real certificates and keys on disk (``registry import`` in process; they are
the ones that connect to the broker), then measures:

In this process, through the registry's own code:

- ``crl_full_sign_s``: signing the base CRL (every revoked certificate still valid) to the
  DER the registry serves, with ``factory.crl.build_crl_der`` (``crl_full_read_s`` reading
  its entries, ``crl_bytes`` its size; ``crl_full_sign_before_s`` the same entries signed the way
  ``build_crl`` did before issue 23, only up to 70,000 entries);
- ``crl_delta_sign_ms``: CPU of one decommission's delta CRL (read, number, sign), median
  of ``--changes`` decommissions (``crl_delta_sign_max_ms`` the largest);
- ``ocsp_p99_ms``: the OCSP responder's ``respond`` (parse, status from the database, sign)
  for random serials of the fleet, no HTTP;
- ``broker_bytes_per_revoked_serial``: the broker's revoked set as a broker loads it from
  the journal the real broker wrote below (tracemalloc, bytes / serials).

Over real processes and sockets (``certfleet registry serve`` on that database, ``certfleet
broker serve --registry-url`` following its feed, lightweight TLS clients from
``bench/broker_bench_lib.py``):

- ``import_per_s``: ``certfleet registry import`` (its own process) of a manifest of
  ``--import-lines`` (default N) freshly minted certificates into an empty database;
- ``broker_start_registry_up_s``: a broker with no state, process start to its metrics
  showing the feed's head applied (the full set enforced); ``max_loop_stall_ms`` includes
  the longest PINGREQ round trip a device connected meanwhile saw (``replay_stall_ms``);
- ``broker_start_registry_down_s``: the same broker restarted with the registry stopped,
  to its metrics showing every serial again, from its own journal;
- ``decommission_drop_p99_ms``: ``--connected`` devices connected, ``--drops`` of them
  decommissioned one after another over the API; the answer to each call to its session's
  socket closing (p99);
- ``storm_stall_ms``: ``--storm`` decommissions from 20 concurrent API clients; the longest
  PINGREQ round trip of a connected device meanwhile (the larger of the two stalls is
  ``max_loop_stall_ms``);
- ``followers_reach_all_s``: ``--followers`` asyncio HTTPS clients long-polling the feed, one
  decommission; its call's start to the last follower's answer; ``healthz_max_ms``: the
  slowest ``/healthz`` meanwhile (one probe every 50 ms);
- ``console_page_p95_ms``: the fleet page and device pages over HTTPS with an operator's
  console session (client wall time; the larger of the two pages' p95);
- ``expiry_scrape_ms``: ``/api/v1/metrics`` with the expiry gauges' cache off (a scrape
  recomputes them while that is cheap; once expensive it answers the last numbers and they
  are recomputed in the background), the slowest of 5; ``expiry_compute_ms``: computing
  them once in process (what the registry does at start and in the background).

Each registry process is *settled* before a phase: its first ``/metrics`` waits for the
gauges it computes at start (:func:`settled`).

Only what was measured is printed; nothing is a placeholder (``--skip`` leaves keys out;
``--phases followers`` runs only the phases named: crl, ocsp, import, broker, followers,
console, expiry). ``--registry-code DIR`` runs the registry process of the followers,
console and expiry phases from another checkout (``git worktree add DIR main``: "before").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlmodel import Session, select

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broker_bench_lib as lib  # noqa: E402
from bench_console import measure as console_measure  # noqa: E402
from bench_console import sign_in  # noqa: E402
from bench_registry import (  # noqa: E402
    decommission_concurrently,
    healthz_probe,
    mint,
    percentile,
    registry_process,
)

from bench.fleet_generator import FleetSpec, generate_fleet  # noqa: E402
from bench.fleet_generator import device_id as fleet_device_id  # noqa: E402
from broker.revoked_set import RevokedSet  # noqa: E402
from factory.ca import CertificateAuthority  # noqa: E402
from factory.crl import RevokedEntry  # noqa: E402
from fleetcore.clock import utcnow  # noqa: E402
from fleetcore.layout import DataLayout  # noqa: E402
from fleetcore.tls import client_context, service_client_context  # noqa: E402
from registry.db import make_engine  # noqa: E402
from registry.importer import import_manifest  # noqa: E402
from registry.models import Certificate  # noqa: E402
from registry.ocsp import OcspResponder  # noqa: E402
from registry.settings import RegistrySettings  # noqa: E402
from registry.store import certificates, tokens  # noqa: E402
from registry.store.audit import Actor  # noqa: E402
from registry.store.expiry import expiry_counts  # noqa: E402
from registry.store.revocations import decommission_device  # noqa: E402

POSTGRES_ADMIN = os.environ.get(
    "CERTFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: this benchmark's PostgreSQL databases (dropped and made afresh at each run)
DATABASE = os.environ.get("CERTFLEET_BENCH_DATABASE", "certfleet_bench23")
#: the quadratic builder is only run while its entries take under about a minute
BEFORE_MAX_ENTRIES = 70_000
#: ``--isolate-broker``: the CPUs the broker and its stall probe run on (empty: any).
BROKER_CPUS: set[int] = set()

#: What ``--phases`` and ``--skip`` name.
PHASES = ("crl", "ocsp", "import", "broker", "followers", "console", "expiry")
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


def measure_crl(ca: CertificateAuthority, engine: Any, active: list[str]) -> dict[str, Any]:
    """The CRL figures; ``active``: generated devices to decommission, one delta each."""
    result: dict[str, Any] = {}
    started = time.perf_counter()
    with Session(engine) as session:
        contents = certificates.crl_contents(session, utcnow())
    result["crl_full_read_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    _, der = ca.build_crl_der(contents.entries, crl_number=contents.crl_number)
    result["crl_full_sign_s"] = round(time.perf_counter() - started, 3)
    result["crl_bytes"] = len(der)
    if len(contents.entries) <= BEFORE_MAX_ENTRIES:
        result["crl_full_sign_before_s"] = round(sign_before(ca, contents.entries), 3)
    cpu_ms = []
    for device_id in active:
        with Session(engine) as session:
            decommission_device(session, device_id, "bench", Actor("spiffe://bench"))
        started = time.process_time()
        with Session(engine) as session:
            delta = certificates.delta_contents(session, utcnow(), contents.head_seq)
        ca.build_crl_der(delta.entries, crl_number=delta.crl_number, delta_of=contents.crl_number)
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


_STARTED = time.monotonic()


def note(message: str) -> None:
    """Progress on stderr (stdout is the JSON)."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- databases ------------------------------------------------------------------------------


@contextmanager
def databases(backend: str, root: Path) -> Iterator[tuple[str, str]]:
    """The fleet's database URL and an empty one for the import; fresh, dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{root / 'registry.db'}", f"sqlite:///{root / 'import.db'}"
        return
    import psycopg

    names = (DATABASE, f"{DATABASE}_import")
    base = POSTGRES_ADMIN.rsplit("/", 1)[0]
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{names[0]}", f"{base}/{names[1]}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings_for(layout: DataLayout, url: str) -> RegistrySettings:
    return RegistrySettings(data_dir=layout.root, registry_database_url=url)


def write_manifest(path: Path, pems: list[str]) -> Path:
    """A factory manifest (one JSON record a line) of ``pems``."""
    with path.open("w", encoding="utf-8") as handle:
        for number, pem in enumerate(pems):
            record = {"certificate_pem": pem, "hardware_serial": f"hw-{path.stem}-{number}"}
            handle.write(json.dumps(record) + "\n")
    return path


def register_connected(layout: DataLayout, url: str, count: int) -> None:
    """Register the devices with keys on disk (the broker's clients) through the importer."""
    pems = [lib.device_files(layout, i)[0].read_text() for i in range(count)]
    manifest = write_manifest(layout.root / "connected.jsonl", pems)
    import_manifest(settings_for(layout, url), manifest, who="bench")


def measure_import(layout: DataLayout, url: str, lines: int) -> dict[str, Any]:
    """``certfleet registry import`` of ``lines`` fresh certificates, in its own process."""
    started = time.perf_counter()
    manifest = write_manifest(layout.root / "manifest.jsonl", mint(layout.root, lines))
    minted = time.perf_counter() - started
    command = [sys.executable, "-m", "certfleet.cli", "--log-level", "warning", "registry",
               "import", "--data-dir", str(layout.root), str(manifest)]  # fmt: skip
    env = {**os.environ, "CERTFLEET_REGISTRY_DATABASE_URL": url}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or f"created={lines}" not in done.stdout:
        raise RuntimeError(f"registry import failed: {done.stdout} {done.stderr}")
    manifest.unlink()
    return {
        "import_lines": lines,
        "import_s": round(seconds, 2),
        "import_per_s": round(lines / seconds),
        "import_mint_s": round(minted, 1),
    }


# -- the broker -----------------------------------------------------------------------------


def broker_metrics(url: str) -> dict[str, float]:
    # uncompressed: the broker would gzip every poll (polled every 50 ms while it starts)
    text = httpx.get(url, timeout=10, headers={"Accept-Encoding": "identity"}).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("certfleet_broker_revoc", "certfleet_broker_revoked_serials")):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def loop_lag_counts(url: str) -> dict[float, float]:
    """The broker's ``certfleet_broker_loop_lag_seconds`` buckets: upper bound -> count."""
    return histogram_counts(url, "certfleet_broker_loop_lag_seconds_bucket{")


def gc_pause_counts(url: str) -> dict[float, float]:
    """The broker's full garbage collections (generation 2): upper bound -> count."""
    return histogram_counts(url, 'certfleet_broker_gc_pause_seconds_bucket{generation="2",')


def histogram_counts(url: str, head: str) -> dict[float, float]:
    """A histogram's buckets on the metrics page at ``url`` whose lines begin with
    ``head``: upper bound -> count."""
    counts = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(head):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            counts[float(bound)] = float(line.rpartition(" ")[2])
    return counts


def loop_lag_bound_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The smallest bucket bound (ms) holding every lag observed between two readings: the
    broker's own longest stall, at the histogram's resolution (None: no observation)."""
    new = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = new.get(float("inf"), 0.0)
    if not total:
        return None
    return min(bound for bound, n in new.items() if n >= total) * 1000


def start_broker(
    layout: DataLayout,
    registry_url: str,
    *,
    seq: int,
    serials: int,
    probe: int | None,
    code: Path = lib.REPO,
) -> tuple[lib.BrokerProcess, float, float | None, dict[str, float]]:
    """Start our broker (``code``'s; node ``scale`` or ``scale-old``) and wait until its
    metrics show feed position ``seq`` and ``serials`` revoked serials; (broker, seconds,
    longest stall seen by device ``probe`` connected as soon as it listens, its metrics)."""
    t0, started = time.time(), time.perf_counter()
    broker = lib.start_ours(
        layout,
        registry_url=registry_url,
        extra_env={"CERTFLEET_BROKER_NODE": "scale" if code == lib.REPO else "scale-old"},
        extra_args=["--metrics-addr", "127.0.0.1:0"],
        repo=code,
        cpus=BROKER_CPUS or None,
    )
    assert broker.metrics_url is not None
    stall_probe = (
        None
        if probe is None
        else lib.StallProbe(layout.root, broker.port, probe, cpus=BROKER_CPUS or None)
    )
    deadline = time.monotonic() + 900
    while True:
        values = broker_metrics(broker.metrics_url)
        # Serials expired since the last run leave the set (pruned at load): counted back.
        held = values.get("certfleet_broker_revoked_serials", 0) + values.get(
            "certfleet_broker_revoked_serials_expired_total", 0
        )
        if values.get("certfleet_broker_revocation_seq", 0) >= seq and held >= serials:
            break
        if time.monotonic() > deadline:
            broker.stop()
            raise RuntimeError(f"broker never caught up: {values}")
        time.sleep(0.05)  # the figure's resolution; each poll costs the broker CPU
    seconds = time.perf_counter() - started
    lag = loop_lag_bound_ms({}, loop_lag_counts(broker.metrics_url))
    if lag is not None:  # (a broker of older code has no such metric)
        values["loop_lag_ms"] = lag
    gc_pause = loop_lag_bound_ms({}, gc_pause_counts(broker.metrics_url))
    if gc_pause is not None:
        values["gc_pause_ms"] = gc_pause
    stall = None
    if stall_probe is not None:
        stall = stall_probe.longest(t0, time.time())
        stall_probe.stop()
    return broker, seconds, stall, values


def revoked_set_bytes(layout: DataLayout) -> tuple[float, int]:
    """Bytes per serial of the revoked set loaded from the broker's journal (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    revoked = RevokedSet(layout.broker_dir, "scale")
    revoked.load()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    count = revoked.serial_count
    revoked.close()
    return used / count, count


# -- the registry over HTTPS ----------------------------------------------------------------


def api(url: str, layout: DataLayout) -> httpx.Client:
    context = service_client_context(layout, "bench-op")
    return httpx.Client(base_url=f"{url}/api/v1", verify=context, timeout=120)


def settled(http: httpx.Client) -> None:
    """Wait until the registry has done its start's own work: its first ``/metrics`` waits
    for the expiry gauges it computes at start (about 2 s of a core at 1,000,000 devices on
    SQLite), which would otherwise share the two cores with what is measured next."""
    http.get("/metrics", timeout=300).raise_for_status()


def head_seq(http: httpx.Client) -> int:
    return int(http.get("/healthz").json()["head_seq"])


async def _followers(url: str, layout: DataLayout, count: int, victim: str) -> float:
    context = service_client_context(layout, "bench-op")
    limits = httpx.Limits(max_connections=count + 2, max_keepalive_connections=count + 2)
    async with httpx.AsyncClient(
        base_url=f"{url}/api/v1", verify=context, timeout=120, limits=limits
    ) as http:
        head = int((await http.get("/healthz")).json()["head_seq"])
        answered: list[float] = []

        async def follow() -> None:
            params = {"after": head, "wait": 30, "kinds": "decommission,superseded"}
            feed = (await http.get("/revocations", params=params)).json()
            if not feed["events"]:
                raise RuntimeError("a follower's long poll ended without the event")
            answered.append(time.perf_counter())

        tasks = [asyncio.create_task(follow()) for _ in range(count)]
        await asyncio.sleep(3)  # every poll parked at the registry
        if any(task.done() for task in tasks):
            raise RuntimeError("a follower was answered before the decommission")
        started = time.perf_counter()
        response = await http.post(f"/devices/{victim}/decommission", json={"reason": "bench"})
        response.raise_for_status()
        await asyncio.gather(*tasks)
        return max(answered) - started


def _healthz_apart(url: str, root: str, stop: Any, out: Any) -> None:
    """The /healthz probe in a process of its own (no GIL shared with the followers)."""
    health: list[float] = []
    done = threading.Event()
    probe = threading.Thread(
        target=healthz_probe, args=(url, DataLayout(Path(root)), done, health), daemon=True
    )
    probe.start()
    stop.wait()
    done.set()
    probe.join(30)
    out.put(health)


def measure_followers(url: str, layout: DataLayout, count: int, victim: str) -> dict[str, Any]:
    """``healthz_max_ms``: probed from this process, as the followers' client (it shares
    their GIL: its figure includes the client's own work as they are answered);
    ``healthz_apart_max_ms``: probed from a process of its own (the registry's part; its
    first probe, which opens the connection, left out)."""
    health: list[float] = []
    stop = threading.Event()
    probe = threading.Thread(target=healthz_probe, args=(url, layout, stop, health), daemon=True)
    spawn = multiprocessing.get_context("spawn")
    apart_stop, apart_out = spawn.Event(), spawn.Queue()
    apart = spawn.Process(
        target=_healthz_apart, args=(url, str(layout.root), apart_stop, apart_out)
    )
    apart.start()
    probe.start()
    try:
        time.sleep(1)  # the other process's probe is running
        reach = asyncio.run(_followers(url, layout, count, victim))
    finally:
        stop.set()
        apart_stop.set()
        probe.join(30)
    apart_health: list[float] = apart_out.get(timeout=60)
    apart.join(30)
    return {
        "followers": count,
        "followers_reach_all_s": round(reach, 3),
        "healthz_max_ms": round(max(health) * 1000, 1),
        "healthz_probes": len(health),
        "healthz_apart_max_ms": round(max(apart_health[1:]) * 1000, 1),
        "healthz_apart_probes": len(apart_health),
    }


def measure_console(
    url: str, layout: DataLayout, token: str, devices: int, reads: int
) -> dict[str, Any]:
    rng = random.Random(5)
    pages = {
        "fleet": lambda: "/ui/",
        "device": lambda: f"/ui/devices/{fleet_device_id(rng.randrange(devices))}",
    }
    result: dict[str, Any] = {}
    with httpx.Client(base_url=url, verify=client_context(layout.root_cert), timeout=60) as http:
        sign_in(http, token)
        for name, page in pages.items():
            for _ in range(3):
                console_measure(http, "GET", page())
            server, wall = [], []
            for _ in range(reads):
                s, w, status = console_measure(http, "GET", page())
                if status != 200:
                    raise RuntimeError(f"console {name}: status {status}")
                server.append(s)
                wall.append(w)
            result[f"console_{name}_p95_ms"] = round(percentile(wall, 95), 1)
            result[f"console_{name}_server_p95_ms"] = round(percentile(server, 95), 1)
    result["console_page_p95_ms"] = max(
        result["console_fleet_p95_ms"], result["console_device_p95_ms"]
    )
    return result


def measure_expiry_scrape(http: httpx.Client, scrapes: int = 5) -> float:
    times = []
    for _ in range(scrapes):
        started = time.perf_counter()
        response = http.get("/metrics")
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        if "certfleet_certificates_expiring" not in response.text:
            raise RuntimeError("/metrics has no expiry gauges")
    return round(max(times), 1)


# -- the run --------------------------------------------------------------------------------


def p99_ms(seconds: list[float]) -> float:
    return round(percentile(seconds, 99) * 1000, 1)


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Fill ``result`` as the figures come (a failure leaves what was measured)."""
    skip = set(args.skip) | (set(PHASES) - set(args.phases.split(",")))
    lib.raise_nofile()
    root = lib.tmp_root("certfleet-scale-")
    try:
        layout = lib.make_fleet(root, args.connected, services=("broker",))
        lib.issue_operator(layout)
        ca = CertificateAuthority.load(layout)
        with databases(args.backend, root) as (url, import_url):
            note("generating the fleet")
            fleet = generate_fleet(ca, url, FleetSpec(args.devices))
            note("registering the connected devices")
            register_connected(layout, url, args.connected)
            result.update(
                {
                    "devices": args.devices,
                    "backend": args.backend,
                    "revoked": len(fleet.revoked_serials),
                    "connected": args.connected,
                    "generate_s": round(fleet.seconds, 1),
                    "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
                }
            )
            engine = make_engine(settings_for(layout, url))
            try:
                note("CRL and OCSP in process")
                if "crl" not in skip:
                    retired = set(fleet.decommissioned)
                    active = [fleet_device_id(i) for i in range(args.devices)]
                    active = [d for d in active if d not in retired][: args.changes]
                    result.update(measure_crl(ca, engine, active))
                if "expiry" not in skip:
                    # what the registry computes at start and then in the background
                    started = time.perf_counter()
                    with Session(engine) as session:
                        expiry_counts(session, utcnow())
                    result["expiry_compute_ms"] = round((time.perf_counter() - started) * 1000)
                if "ocsp" not in skip:
                    with Session(engine) as session:
                        sample = session.exec(select(Certificate.serial).limit(20_000)).all()
                    serials = [int(s, 16) for s in sample]
                    result["ocsp_p99_ms"] = measure_ocsp(ca, engine, serials, args.ocsp_requests)
                with Session(engine) as session:
                    token = tokens.create_token(session, "bench", Actor("bench"))
            finally:
                engine.dispose()
            note("import")
            if "import" not in skip:
                result.update(measure_import(layout, import_url, args.import_lines or args.devices))
            measure_live(layout, url, token, args, skip, result)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_live(
    layout: DataLayout,
    url: str,
    token: str,
    args: argparse.Namespace,
    skip: set[str],
    result: dict[str, Any],
) -> None:
    """Everything measured over the registry's and the broker's processes, into ``result``."""
    env = {"CERTFLEET_REGISTRY_EXPIRY_METRICS_CACHE_S": "0"}
    per_code = 0 if "broker" in skip else args.drops + args.storm
    picked = random.Random(3).sample(range(args.connected - 1), 2 * per_code + 1)
    names = [lib.device_id(i) for i in picked]
    if "broker" not in skip:
        broker_phases(layout, url, env, args, names[:per_code], lib.REPO, result)
    if args.old_code is not None and "broker" not in skip:
        old: dict[str, Any] = {}
        broker_phases(layout, url, env, args, names[per_code:-1], args.old_code, old)
        result.update({f"{key}_before": value for key, value in old.items()})
    if args.registry_code is not None:
        result["registry_code"] = str(args.registry_code)
    with registry_process(
        layout.root, url, extra_env=env, start_timeout=900, code=args.registry_code
    ) as registry_url:
        with api(registry_url, layout) as http:
            settled(http)
        if "followers" not in skip:
            note("followers")
            result.update(measure_followers(registry_url, layout, args.followers, names[-1]))
        if "console" not in skip:
            note("console")
            result.update(measure_console(registry_url, layout, token, args.devices, args.reads))
        if "expiry" not in skip:
            note("expiry scrape")
            with api(registry_url, layout) as http:
                result["expiry_scrape_ms"] = measure_expiry_scrape(http)


def broker_phases(
    layout: DataLayout,
    url: str,
    env: dict[str, str],
    args: argparse.Namespace,
    names: list[str],
    code: Path,
    result: dict[str, Any],
) -> None:
    """A broker of ``code`` against the registry: its start with the registry up (from
    nothing) and down (from its own files), then ``args.connected`` devices, drops of
    ``names[:drops]`` one by one and a storm of the rest, stalls seen by a probe device;
    the figures go into ``result`` as they come."""
    probe_device = args.connected - 1  # never decommissioned
    note(f"{code}: registry up; broker from nothing")
    with registry_process(layout.root, url, extra_env=env, start_timeout=900) as registry_url:
        with api(registry_url, layout) as http:
            head = head_seq(http)
            settled(http)
        broker, seconds, stall, values = start_broker(
            layout, registry_url, seq=head, serials=0, probe=probe_device, code=code
        )
        broker.stop()
        result["broker_start_registry_up_s"] = round(seconds, 2)
        result["replay_stall_ms"] = stall
        result["replay_loop_lag_ms"] = values.get("loop_lag_ms")
        result["replay_gc_pause_ms"] = values.get("gc_pause_ms")
        serials = int(values["certfleet_broker_revoked_serials"])
        result["broker_revoked_serials"] = serials
    if code == lib.REPO:
        per_serial, _ = revoked_set_bytes(layout)
        result["broker_bytes_per_revoked_serial"] = round(per_serial, 1)
    note(f"{code}: broker with the registry down")
    # The broker loads its own files before its metrics answer: the feed's head there means
    # the set is loaded. The count is not waited for but recorded: serials that expired
    # since the first broker stopped leave at load (round 9's PostgreSQL run waited for
    # the first broker's count and never ended).
    broker, seconds, _, down = start_broker(
        layout, registry_url, seq=head, serials=0, probe=None, code=code
    )  # the registry is down: its URL answers nothing now
    broker.stop()
    result["broker_start_registry_down_s"] = round(seconds, 2)
    result["broker_down_revoked_serials"] = int(down.get("certfleet_broker_revoked_serials", 0))
    with registry_process(layout.root, url, extra_env=env, start_timeout=900) as registry_url:
        http = api(registry_url, layout)
        head = head_seq(http)
        settled(http)
        broker, seconds, _, _ = start_broker(
            layout, registry_url, seq=head, serials=0, probe=None, code=code
        )
        result["broker_resume_registry_up_s"] = round(seconds, 2)
        workers: list[Any] = []
        try:
            note(f"{code}: connecting devices")
            workers = lib.spawn_device_workers(
                lib.__file__, layout.root, broker.port, args.connected - 1, 2
            )
            watcher = lib.DropWatcher(workers)
            result["connected_sessions"] = watcher.connected
            probe = lib.StallProbe(
                layout.root, broker.port, probe_device, cpus=BROKER_CPUS or None
            )
            note(f"{code}: drops")
            drops, missed = lib.time_drops(http, watcher, names[: args.drops])
            result["decommission_drop_p99_ms"] = p99_ms(drops)
            result["decommission_drop_p50_ms"] = round(statistics.median(drops) * 1000, 1)
            result["decommission_drop_missed"] = missed
            storm = names[args.drops :]
            note(f"{code}: storm")
            t0 = time.time()
            lag_before = loop_lag_counts(broker.metrics_url)
            gc_before = gc_pause_counts(broker.metrics_url)
            latencies, statuses = decommission_concurrently(registry_url, layout, storm, 20)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not set(storm) <= watcher.closed_names():
                time.sleep(0.05)
            result["storm_stall_ms"] = probe.longest(t0, time.time())
            result["storm_loop_lag_ms"] = loop_lag_bound_ms(
                lag_before, loop_lag_counts(broker.metrics_url)
            )
            result["storm_gc_pause_ms"] = loop_lag_bound_ms(
                gc_before, gc_pause_counts(broker.metrics_url)
            )
            result["storm_dropped"] = len(set(storm) & watcher.closed_names())
            result["storm_statuses"] = dict(statuses)
            result["storm_decommission_p99_ms"] = p99_ms(latencies)
            probe.stop()
            result["max_loop_stall_ms"] = max(stall or 0, result["storm_stall_ms"])
        finally:
            lib.stop_workers(workers)
            broker.stop()
            http.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--connected", type=int, default=10_000, help="devices connected")
    parser.add_argument("--drops", type=int, default=100, help="decommissions timed to drop")
    parser.add_argument("--storm", type=int, default=1000, help="concurrent decommissions")
    parser.add_argument("--followers", type=int, default=100)
    parser.add_argument("--reads", type=int, default=50, help="reads of each console page")
    parser.add_argument("--changes", type=int, default=20, help="decommissions, one delta each")
    parser.add_argument("--ocsp-requests", type=int, default=2000)
    parser.add_argument("--import-lines", type=int, default=0, help="default: --devices")
    parser.add_argument("--skip", action="append", default=[], choices=PHASES)
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default all: {','.join(PHASES)})",
    )
    parser.add_argument(
        "--registry-code",
        type=Path,
        help="a checkout whose registry serves the followers, console and expiry phases "
        "(git worktree add /tmp/old main): the registry's 'before'",
    )
    parser.add_argument(
        "--old-code",
        type=Path,
        help="a worktree of the code before issue 23 (git worktree add /tmp/old67 67df084): "
        "its broker is measured the same way, keys with _before",
    )
    parser.add_argument(
        "--isolate-broker",
        action="store_true",
        help="the broker and the stall probe on the last CPU, everything else (registry, "
        "device workers, this process) on the others: the broker's stalls without the wait "
        "for a core the registry and the simulated devices use (a node on its own machine)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    result: dict[str, Any] = {}
    if args.isolate_broker:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            parser.error("--isolate-broker needs two CPUs or more")
        BROKER_CPUS.add(allowed[-1])
        os.sched_setaffinity(0, set(allowed[:-1]))  # children (registry, workers) inherit
        result["broker_cpus"] = sorted(BROKER_CPUS)
    failed = False
    try:
        run(args, result)
    except Exception as exc:  # print what was measured before the failure, then fail
        result["error"] = repr(exc)
        failed = True
        traceback.print_exc()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
