"""Benchmark: EST first enrollments per second, end to end, each on a new TLS connection.

    flock /tmp/certfleet-cpu.lock .venv/bin/python bench/bench_est.py --enrollments 600

The registry runs as its own process (``certfleet registry serve``, SQLite, one uvicorn
worker); this process plays the devices: ``--concurrency`` threads, each enrollment a new
TCP + TLS 1.3 connection presenting the batch's claim certificate and a POST of a
base64 CSR to ``/.well-known/est/simpleenroll`` (http.client, the lightest client here). CSRs
and their keys are made beforehand (key generation is the device's cost). Both share the
machine's two cores, so the figure is conservative for the registry.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from sqlmodel import Session

from factory.ca import CertificateAuthority, write_issued
from factory.claims import mint_claim
from fleetcore.keys import generate_key
from fleetcore.layout import DataLayout
from registry.db import make_engine, migrate
from registry.est.models import ClaimRegistration
from registry.settings import RegistrySettings
from registry.store.audit import Actor
from registry.store.claims import record_claim


def _csrs(count: int) -> list[bytes]:
    bodies = []
    for index in range(count):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dev-est-{index:06d}")])
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(name)
            .sign(generate_key(), hashes.SHA256())
        )
        bodies.append(base64.b64encode(csr.public_bytes(serialization.Encoding.DER)))
    return bodies


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_registry(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = root / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "certfleet.cli", "registry", "serve", "--data-dir", str(root),
         "--addr", "127.0.0.1:0", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=open(root / "registry.log", "wb"),  # noqa: SIM115
        env={**{k: v for k, v in os.environ.items() if k != "CERTFLEET_TELEMETRY_BROKER_ADDR"},
             "CERTFLEET_REGISTRY_VERIFY_PROCESSES": "0"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log = (root / "registry.log").read_text()[-2000:]
            raise SystemExit(f"registry did not start: {log}")
        time.sleep(0.1)
    url: str = json.loads(ready.read_text())["url"]
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--enrollments", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-est-") as tmp:
        root = Path(tmp)
        layout = DataLayout(root)
        ca = CertificateAuthority.init(layout, "fleet.local")
        issued, record = mint_claim(
            ca, "bench", quota=args.enrollments, lifetime=dt.timedelta(days=1), allow=[]
        )
        write_issued(issued, root / "claim.crt", root / "claim.key")
        engine = make_engine(RegistrySettings(data_dir=root))
        migrate(engine)
        with Session(engine) as session:
            record_claim(session, ClaimRegistration.model_validate(record.as_json()), Actor("b"))
        engine.dispose()
        bodies = _csrs(args.enrollments)
        process, url = _start_registry(root)
        try:
            host, port = url.removeprefix("https://").split(":")
            context = ssl.create_default_context(cafile=str(layout.root_cert))
            context.load_cert_chain(str(root / "claim.crt"), str(root / "claim.key"))
            latencies: list[float] = []
            failures: list[int] = []
            lock = threading.Lock()
            queue = list(range(len(bodies)))

            def worker() -> None:
                while True:
                    with lock:
                        if not queue:
                            return
                        index = queue.pop()
                    started = time.perf_counter()
                    connection = http.client.HTTPSConnection(
                        host, int(port), context=context, timeout=60
                    )
                    connection.request(
                        "POST", "/.well-known/est/simpleenroll", body=bodies[index],
                        headers={"Content-Type": "application/pkcs10"},
                    )  # fmt: skip
                    response = connection.getresponse()
                    response.read()
                    connection.close()
                    with lock:
                        latencies.append(time.perf_counter() - started)
                        if response.status != 200:
                            failures.append(response.status)

            load = os.getloadavg()[0]
            registry_cpu = _cpu_s(process.pid)
            client_cpu = time.process_time()
            started = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            registry_cpu = _cpu_s(process.pid) - registry_cpu
            client_cpu = time.process_time() - client_cpu
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        latencies.sort()
        print(
            json.dumps(
                {
                    "enrollments": args.enrollments,
                    "concurrency": args.concurrency,
                    "failures": len(failures),
                    "elapsed_s": round(elapsed, 2),
                    "per_s": round(args.enrollments / elapsed, 1),
                    "p50_ms": round(statistics.median(latencies) * 1000, 1),
                    "p95_ms": round(latencies[int(0.95 * len(latencies))] * 1000, 1),
                    "load_before": round(load, 2),
                    "registry_cpu_ms_each": round(registry_cpu * 1000 / args.enrollments, 2),
                    "client_cpu_ms_each": round(client_cpu * 1000 / args.enrollments, 2),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
