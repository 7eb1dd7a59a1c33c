"""OCSP responder benchmark: signed answers per second and latency on the publication
listener, for a mix of good and revoked certificates.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_ocsp.py \
        [--devices 10000] [--revoked 500] [--clients 8] [--seconds 20]

The registry runs as its own process (``certfleet registry serve --publish-addr``, SQLite);
this script registers ``--devices`` certificates over HTTPS, decommissions ``--revoked``
of them, then ``--clients`` threads POST OCSP requests (SHA-1 CertID, a nonce each, what
OpenSSL sends) for random serials for ``--seconds`` and check every answer's status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from factory.ca import CertificateAuthority, write_issued
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from fleetcore.tls import service_client_context

BATCH = 1000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_registry(layout: DataLayout, publish_port: int) -> tuple[subprocess.Popen[bytes], str]:
    ready = layout.root / "ready.json"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "certfleet.cli", "--log-level", "warning", "registry", "serve",
            "--data-dir", str(layout.root), "--addr", "127.0.0.1:0",
            "--publish-addr", f"127.0.0.1:{publish_port}", "--ready-file", str(ready),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("registry did not start")
        time.sleep(0.05)
    return process, str(json.loads(ready.read_text())["url"])


def request_der(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA1())
        .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--revoked", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="certfleet-bench-ocsp-"))
    layout = DataLayout(base)
    port = free_port()
    publish_url = f"http://127.0.0.1:{port}"
    ca = CertificateAuthority.init(layout, "bench.test", publish_url=publish_url)
    operator = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "bench-op"))
    write_issued(operator, layout.client_cert("bench-op"), layout.client_key("bench-op"))
    certificates = [
        ca.issue_client(ca.identity(IdentityKind.DEVICE, f"bench-{i:06d}")).certificate
        for i in range(args.devices)
    ]
    process, url = start_registry(layout, port)
    try:
        context = service_client_context(layout, "bench-op")
        with httpx.Client(base_url=f"{url}/api/v1", verify=context, timeout=120) as http:
            for start in range(0, len(certificates), BATCH):
                batch = certificates[start : start + BATCH]
                body = {
                    "devices": [
                        {"certificate_pem": c.public_bytes(serialization.Encoding.PEM).decode()}
                        for c in batch
                    ]
                }
                assert http.post("/devices/batch", json=body).status_code == 200
            revoked = set(random.sample(range(args.devices), args.revoked))
            for index in revoked:
                response = http.post(
                    f"/devices/bench-{index:06d}/decommission", json={"reason": "bench"}
                )
                assert response.status_code == 200, response.text

        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client() -> None:
            mine: list[float] = []
            with httpx.Client(timeout=30) as session:
                while time.perf_counter() < stop_at:
                    index = random.randrange(args.devices)
                    der = request_der(certificates[index], ca.issuing_cert)
                    t0 = time.perf_counter()
                    reply = session.post(
                        f"{publish_url}/ocsp",
                        content=der,
                        headers={"content-type": "application/ocsp-request"},
                    )
                    mine.append(time.perf_counter() - t0)
                    answer = ocsp.load_der_ocsp_response(reply.content)
                    expected = (
                        ocsp.OCSPCertStatus.REVOKED
                        if index in revoked
                        else ocsp.OCSPCertStatus.GOOD
                    )
                    if answer.certificate_status is not expected:
                        with lock:
                            errors.append(f"bench-{index:06d}: {answer.certificate_status}")
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.seconds + 60)
        elapsed = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(base, ignore_errors=True)

    ordered = sorted(latencies)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "devices": args.devices,
        "revoked": args.revoked,
        "clients": args.clients,
        "answers": len(latencies),
        "answers_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            "p50": round(1000 * statistics.median(ordered), 2),
            "p99": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2),
            "max": round(1000 * ordered[-1], 2),
        },
        "wrong_status": len(errors),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if errors:
        raise SystemExit(f"{len(errors)} answers had the wrong status, e.g. {errors[0]}")


if __name__ == "__main__":
    main()
