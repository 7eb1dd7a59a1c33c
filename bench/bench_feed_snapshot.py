"""The feed's snapshot and compaction against fleet size (issue 23), in process, SQLite.

    flock /tmp/certfleet-cpu.lock .venv/bin/python -m bench.bench_feed_snapshot \
        --devices 10000,100000

For each size: a fleet from ``bench/fleet_generator.py`` (about half the devices with a
superseded certificate still revoked, 3 % decommissioned), then ``revocation_snapshot`` read
and encoded as the route does (seconds, bytes), the broker's parse of it into events
(``RevocationSnapshot.as_events``, seconds), and ``compact_feed`` with every event older
than now + 10 years (so every event whose certificates all expire by then goes: the
worst case, seconds and events removed). One JSON line per size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broker_bench_lib as lib  # noqa: E402

from bench.fleet_generator import FleetSpec, generate_fleet  # noqa: E402
from factory.ca import CertificateAuthority  # noqa: E402
from fleetcore.clock import utcnow  # noqa: E402
from fleetcore.revocation_feed import RevocationSnapshot  # noqa: E402
from registry.db import make_engine  # noqa: E402
from registry.settings import RegistrySettings  # noqa: E402
from registry.store.revocations import compact_feed, revocation_snapshot  # noqa: E402


def measure(devices: int) -> dict[str, float | int]:
    root = Path(tempfile.mkdtemp(prefix="certfleet-snapshot-"))
    try:
        layout = lib.make_fleet(root, 1, services=())
        ca = CertificateAuthority.load(layout)
        url = f"sqlite:///{root / 'registry.db'}"
        fleet = generate_fleet(ca, url, FleetSpec(devices))
        engine = make_engine(RegistrySettings(data_dir=root, registry_database_url=url))
        with Session(engine) as session:
            started = time.perf_counter()
            body = revocation_snapshot(session).model_dump_json().encode()
            snapshot_s = time.perf_counter() - started
        started = time.perf_counter()
        snapshot = RevocationSnapshot.model_validate_json(body)
        events = snapshot.as_events()
        parse_s = time.perf_counter() - started
        with Session(engine) as session:
            started = time.perf_counter()
            compacted = compact_feed(session, utcnow() + dt.timedelta(days=3650))
            compact_s = time.perf_counter() - started
        engine.dispose()
        return {
            "devices": devices,
            "revoked": len(fleet.revoked_serials),
            "snapshot_serials": len(snapshot.not_after),
            "snapshot_devices": len(snapshot.devices),
            "snapshot_s": round(snapshot_s, 3),
            "snapshot_bytes": len(body),
            "broker_parse_s": round(parse_s, 3),
            "broker_events": len(events),
            "compact_s": round(compact_s, 2),
            "compacted_events": compacted.removed,
            "head_seq": compacted.head_seq,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10000,100000")
    args = parser.parse_args()
    for size in (int(n) for n in args.devices.split(",")):
        print(json.dumps(measure(size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
