"""Decommission burst (issue 11.2): N concurrent decommissions from C clients, each client
its own TLS connection, against a registry process on SQLite and (when reachable)
PostgreSQL, with /healthz probed throughout.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_decommission_burst.py \
        [--devices 200] [--clients 50] [--skip-postgres] [--json out.json]

Reports per database: decommission latency p50/p99/max, /healthz max, every status seen,
whether the feed got exactly N new gap-free events, and whether the CRL lists all N serials.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_registry import (  # noqa: E402
    client,
    decommission_concurrently,
    healthz_probe,
    mint,
    registry_process,
    scratch_postgres,
    summary_ms,
)

from factory.ca import CertificateAuthority, write_issued  # noqa: E402
from fleetcore.layout import DataLayout  # noqa: E402
from fleetcore.profile import IdentityKind  # noqa: E402


def run(label: str, url: str, layout: DataLayout, pems: list[str], clients: int) -> dict[str, Any]:
    with client(url, layout) as operator:
        for start in range(0, len(pems), 1000):
            body = {"devices": [{"certificate_pem": p} for p in pems[start : start + 1000]]}
            operator.post("/devices/batch", json=body).raise_for_status()
        head = int(operator.get("/healthz").json()["head_seq"])
    certificates = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    ids = [c.subject.rfc4514_string().split("=", 1)[1] for c in certificates]
    health: list[float] = []
    stop = threading.Event()
    probe = threading.Thread(target=healthz_probe, args=(url, layout, stop, health), daemon=True)
    probe.start()
    started = time.perf_counter()
    latencies, statuses = decommission_concurrently(url, layout, ids, clients)
    wall = time.perf_counter() - started
    stop.set()
    probe.join(30)

    with client(url, layout) as operator:
        feed = operator.get("/revocations", params={"after": head, "limit": 5000}).json()
        crl = x509.load_der_x509_crl(operator.get("/crl.der").content)
    seqs = [event["seq"] for event in feed["events"]]
    in_crl = sum(
        crl.get_revoked_certificate_by_serial_number(c.serial_number) is not None
        for c in certificates
    )
    return {
        "database": label,
        "devices": len(pems),
        "clients": clients,
        "wall_s": round(wall, 2),
        "decommission": summary_ms(latencies),
        "statuses": dict(statuses),
        "healthz_max_ms": round(max(health) * 1000, 2) if health else None,
        "healthz_probes": len(health),
        "feed_events": len(seqs),
        "feed_gap_free": seqs == list(range(head + 1, head + len(pems) + 1)),
        "crl_lists_all": in_crl == len(pems),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="certfleet-bench-burst-"))
    layout = DataLayout(base)
    ca = CertificateAuthority.init(layout, "bench.test")
    operator = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "bench-op"))
    write_issued(operator, layout.client_cert("bench-op"), layout.client_key("bench-op"))
    results = []
    # Each database gets its own devices: a decommissioned device cannot be registered again.
    with registry_process(base, None) as url:
        results.append(run("sqlite", url, layout, mint(base, args.devices), args.clients))
    if not args.skip_postgres:
        with scratch_postgres() as pg_url:
            if pg_url is not None:
                with registry_process(base, pg_url) as url:
                    pems = mint(base, args.devices)
                    results.append(run("postgresql", url, layout, pems, args.clients))
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    report["results"] = results  # type: ignore[assignment]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
