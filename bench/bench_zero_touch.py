"""Benchmark: a zero-touch fleet from claim to publishing.

    flock /tmp/certfleet-cpu.lock .venv/bin/python bench/bench_zero_touch.py --devices 1000

Real processes, as ``certfleet demo`` runs them: a new CA, the registry (``certfleet registry
serve``, SQLite) and the broker (``certfleet broker serve``) as subprocesses, a claim minted
and recorded by ``certfleet factory claim create`` with an allow-list of ``--devices``
hardware serials. Then this process plays the devices, timed from the first enrollment: each
makes its key, enrolls over EST with the claim (:func:`device_sim.est_enroll.enroll_fleet`,
``--concurrency`` in flight, each a new TLS connection), writes its bundle, and the
simulator (:class:`device_sim.runner.SimRun`) connects them all and publishes. The figure
is the time until every device is connected and the broker has acknowledged at least
as many readings as there are devices (about the first reading of each).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from certfleet.credentials import ensure_client_cert, ensure_service_certs
from certfleet.demo import OPERATOR
from certfleet.procs import ISOLATED_ENV, ProcessGroup, create_claim, free_port
from device_sim.device import DeviceConfig
from device_sim.est_enroll import ClaimCredentials, enroll_fleet, hardware_serials
from device_sim.runner import SimRun
from factory.ca import CertificateAuthority
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind


def _publishing(run: SimRun, devices: int, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = run.snapshot()
        if stats.connected >= devices and stats.acked >= devices:
            return time.monotonic()
        run.wait(0.05)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-zt-") as tmp:
        root = Path(tmp)
        layout = DataLayout(root)
        ca = CertificateAuthority.init(layout, "fleet.local")
        ensure_service_certs(ca, layout)
        ensure_client_cert(ca, layout, IdentityKind.OPERATOR, OPERATOR)
        serials = hardware_serials("SN-ZT-", args.devices)
        allow = root / "batch.allow"
        allow.write_text("".join(f"zt-{s[-6:]},{s}\n" for s in serials))
        broker_addr = f"127.0.0.1:{free_port()}"
        with ProcessGroup(root / "logs") as group:
            registry = group.start_registry(
                root, "127.0.0.1:0", telemetry_broker=broker_addr, env=ISOLATED_ENV
            )
            url = str(registry.ready["url"])
            create_claim(
                root, "bench", quota=args.devices, allow_file=allow, registry_url=url,
                env=ISOLATED_ENV,
            )  # fmt: skip
            group.start_broker(root, broker_addr, registry_url=url, env=ISOLATED_ENV)
            fleet = root / "fleet"
            started = time.monotonic()
            report = enroll_fleet(
                ClaimCredentials.load(root / "claims" / "bench"),
                url,
                serials,
                fleet,
                broker_addr,
                concurrency=args.concurrency,
            )
            enrolled_at = time.monotonic()
            host, port = broker_addr.rsplit(":", 1)
            with SimRun(
                report.enrolled,
                DeviceConfig(host, int(port), rate=1.0, qos=1),
                duration=3600,
                workers=1,
            ) as run:
                publishing_at = _publishing(run, len(report.enrolled), 300)
                run.stop()
                run.wait(30)
    result = {
        "devices": args.devices,
        "enrolled": len(report.enrolled),
        "refused": len(report.refused),
        "enroll_concurrency": args.concurrency,
        "enrollment_s": round(enrolled_at - started, 2),
        "enrollments_per_s": round(len(report.enrolled) / (enrolled_at - started), 1),
        "claim_to_publishing_s": (
            None if publishing_at is None else round(publishing_at - started, 2)
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
