"""Fill a registry database with a synthetic fleet, by bulk insert (issue 23).

    .venv/bin/python -m bench.fleet_generator --data-dir DIR --devices 100000 \
        [--database-url postgresql://postgres@127.0.0.1:5432/fleet] [--real-certificates]

N devices, each with a live certificate (not_after staggered over a year); about half of
them renewed, so their superseded certificate is revoked (reason superseded) and still
listed until it expires; a few percent decommissioned (their live certificate revoked).
Every revocation has its feed event, in time order, and the feed counter points at the last.
Rows go in by ``executemany`` on SQLite and ``COPY`` on PostgreSQL (psycopg), in the formats
the registry's own ORM writes (a test reads them back through the registry).

Certificates: with ``real_certificates`` each row stores its own certificate, minted by the
CA with the row's serial, dates and device identity (about 3,000 per second per core);
without, rows store one of a small pool of real certificates of the same CA. The registry
reads the serial, dates and status from the row's columns (OCSP, CRLs, feed, console lists,
expiry); it re-parses the stored PEM only to re-deliver a renewal or to re-enroll, which the
benchmarks at scale do not do.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from factory.ca import CertificateAuthority
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, certificate_pem, new_serial, serial_hex
from registry.db import make_engine, migrate
from registry.settings import RegistrySettings

__all__ = ["FleetSpec", "GeneratedFleet", "device_id", "generate_fleet"]

LIFETIME = dt.timedelta(days=365)
#: devices renew at 2/3 of their certificate's life (docs/lifecycle.md)
RENEW_AT = 2 / 3
CHUNK = 20_000
POOL_SIZE = 64
OPERATOR = "spiffe://fleet-generator"

_DEVICE_COLUMNS = ("device_id", "status", "created_at", "decommissioned_at", "last_seen_at")
_CERT_COLUMNS = (
    "serial",
    "device_id",
    "not_before",
    "not_after",
    "status",
    "revoked_at",
    "revocation_reason",
    "certificate_pem",
    "confirmed_at",
)
_EVENT_COLUMNS = (
    "seq",
    "device_id",
    "serials",
    "reason",
    "reason_code",
    "revoked_at",
    "operator",
    "kind",
)


@dataclass(frozen=True)
class FleetSpec:
    devices: int
    #: devices with a superseded certificate still on the CRL
    superseded: float = 0.5
    #: devices decommissioned (every live certificate revoked)
    decommissioned: float = 0.03
    real_certificates: bool = False
    seed: int = 23


@dataclass
class GeneratedFleet:
    devices: int
    certificates: int = 0
    #: serials (int) of the revoked certificates not yet expired: the CRL's entries
    revoked_serials: list[int] = field(default_factory=list)
    decommissioned: list[str] = field(default_factory=list)
    feed_head: int = 0
    seconds: float = 0.0


def device_id(index: int) -> str:
    return f"dev-{index:07d}"


@dataclass
class _Rows:
    devices: list[tuple[Any, ...]] = field(default_factory=list)
    certificates: list[tuple[Any, ...]] = field(default_factory=list)
    #: (revoked_at, device_id, serials, reason, reason_code, kind) before seq is assigned
    events: list[tuple[Any, ...]] = field(default_factory=list)


class _Pem:
    """Certificate PEM for a row: minted for it, or from a pool of real ones."""

    def __init__(self, ca: CertificateAuthority, real: bool) -> None:
        self._ca = ca
        self._real = real
        self._key = ec.generate_private_key(ec.SECP256R1()).public_key()
        self._pool = [] if real else [self._mint(f"pool-{i}") for i in range(POOL_SIZE)]

    def _mint(
        self,
        name: str,
        serial: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> str:
        issued = self._ca.issue_client(
            self._ca.identity(IdentityKind.DEVICE, name),
            public_key=self._key,
            serial=serial,
            not_before=not_before,
            not_after=not_after,
        )
        return certificate_pem(issued.certificate).decode()

    def __call__(
        self, name: str, serial: int, not_before: dt.datetime, not_after: dt.datetime
    ) -> str:
        if self._real:
            return self._mint(name, serial, not_before, not_after)
        return self._pool[serial % POOL_SIZE]


def _device_rows(
    index: int,
    spec: FleetSpec,
    now: dt.datetime,
    rng: random.Random,
    pem: _Pem,
    rows: _Rows,
    fleet: GeneratedFleet,
) -> None:
    """The rows of one device: its live certificate, maybe a superseded one, maybe retired."""
    name = device_id(index)
    decommissioned = rng.random() < spec.decommissioned
    renewed = rng.random() < spec.superseded
    remaining = LIFETIME * (1 - RENEW_AT)
    old_not_before: dt.datetime | None = None
    old_not_after: dt.datetime | None = None
    if renewed:
        # The old certificate expires within the third of a life left at its renewal.
        old_not_after = now + remaining * rng.random()
        old_not_before = old_not_after - LIFETIME
        live_not_before = old_not_after - remaining
    else:
        live_not_before = now - LIFETIME * RENEW_AT * rng.random()
    live_not_after = live_not_before + LIFETIME
    created_at = old_not_before or live_not_before
    live_serial = new_serial()
    decommissioned_at = now - dt.timedelta(days=30) * rng.random() if decommissioned else None
    status = "decommissioned" if decommissioned else "active"
    rows.devices.append((name, status, created_at, decommissioned_at, None))
    if renewed:
        assert old_not_before is not None and old_not_after is not None
        old_serial = new_serial()
        revoked_at = live_not_before + dt.timedelta(hours=1)
        rows.certificates.append(
            (serial_hex(old_serial), name, old_not_before, old_not_after, "revoked", revoked_at,
             "superseded", pem(name, old_serial, old_not_before, old_not_after), old_not_before)
        )  # fmt: skip
        rows.events.append(
            (revoked_at, name, [serial_hex(old_serial)], f"superseded by {serial_hex(live_serial)}",
             "superseded", "superseded")
        )  # fmt: skip
        fleet.revoked_serials.append(old_serial)
    rows.certificates.append(
        (serial_hex(live_serial), name, live_not_before, live_not_after,
         "revoked" if decommissioned else "live", decommissioned_at,
         "cessationOfOperation" if decommissioned else None,
         pem(name, live_serial, live_not_before, live_not_after), live_not_before)
    )  # fmt: skip
    if decommissioned:
        rows.events.append(
            (decommissioned_at, name, [serial_hex(live_serial)], "retired by the fleet generator",
             "cessationOfOperation", "decommission")
        )  # fmt: skip
        fleet.revoked_serials.append(live_serial)
        fleet.decommissioned.append(name)
    fleet.certificates += 2 if renewed else 1


def generate_fleet(ca: CertificateAuthority, database_url: str, spec: FleetSpec) -> GeneratedFleet:
    """Migrate the (empty) database at ``database_url`` and fill it with ``spec``'s fleet."""
    started = time.monotonic()
    settings = RegistrySettings(data_dir=ca.layout.root, registry_database_url=database_url)
    engine = make_engine(settings)
    try:
        migrate(engine)
        fleet = GeneratedFleet(spec.devices)
        rng = random.Random(spec.seed)
        pem = _Pem(ca, spec.real_certificates)
        now = utcnow()
        events: list[tuple[Any, ...]] = []
        raw = engine.raw_connection()
        try:
            writer = _Writer(raw.driver_connection, engine.dialect.name)
            for start in range(0, spec.devices, CHUNK):
                rows = _Rows()
                for index in range(start, min(start + CHUNK, spec.devices)):
                    _device_rows(index, spec, now, rng, pem, rows, fleet)
                writer.insert("device", _DEVICE_COLUMNS, rows.devices)
                writer.insert("certificate", _CERT_COLUMNS, rows.certificates)
                writer.commit()
                events.extend(rows.events)
            events.sort(key=lambda event: event[0])
            feed = [
                (seq, name, serials, reason, code, at, OPERATOR, kind)
                for seq, (at, name, serials, reason, code, kind) in enumerate(events, 1)
            ]
            for start in range(0, len(feed), CHUNK):
                writer.insert("revocation", _EVENT_COLUMNS, feed[start : start + CHUNK])
            writer.set_counter("revocation_seq", len(feed))
            writer.commit()
            writer.analyze()
        finally:
            raw.close()
        fleet.feed_head = len(events)
        fleet.seconds = time.monotonic() - started
        return fleet
    finally:
        engine.dispose()


class _Writer:
    """Bulk inserts in the column formats the registry's ORM writes."""

    def __init__(self, connection: Any, dialect: str) -> None:
        self._connection = connection
        self._sqlite = dialect == "sqlite"
        if self._sqlite:
            assert isinstance(connection, sqlite3.Connection)
            connection.execute("BEGIN")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self._sqlite:
            marks = ", ".join("?" for _ in columns)
            self._connection.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                (tuple(_sqlite_value(v) for v in row) for row in rows),
            )
            return
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        with self._connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([json.dumps(v) if isinstance(v, list) else v for v in row])

    def set_counter(self, name: str, value: int) -> None:
        mark = "?" if self._sqlite else "%s"
        self._connection.execute(
            f"UPDATE counter SET value = {mark} WHERE name = {mark}",  # noqa: S608
            (value, name),
        )

    def commit(self) -> None:
        if self._sqlite:
            self._connection.execute("COMMIT")
            self._connection.execute("BEGIN")
        else:
            self._connection.commit()

    def analyze(self) -> None:
        """Fresh planner statistics: the registry's queries are planned on this size."""
        if self._sqlite:
            self._connection.execute("COMMIT")
            self._connection.execute("ANALYZE")
        else:
            self._connection.execute("ANALYZE")
            self._connection.commit()


def _sqlite_value(value: Any) -> Any:
    """SQLAlchemy's SQLite formats: naive UTC text with microseconds; JSON as text."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, list):
        return json.dumps(value)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="a CA is made here if none")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--database-url", default=None, help="default: <data-dir>/registry.db")
    parser.add_argument("--real-certificates", action="store_true")
    args = parser.parse_args(argv)
    layout = DataLayout(args.data_dir)
    exists = layout.root_cert.exists()
    ca = CertificateAuthority.load(layout) if exists else CertificateAuthority.init(layout)
    url = args.database_url or f"sqlite:///{layout.root / 'registry.db'}"
    spec = FleetSpec(args.devices, real_certificates=args.real_certificates)
    fleet = generate_fleet(ca, url, spec)
    print(json.dumps({
        "devices": fleet.devices, "certificates": fleet.certificates,
        "revoked": len(fleet.revoked_serials), "decommissioned": len(fleet.decommissioned),
        "feed_head": fleet.feed_head, "seconds": round(fleet.seconds, 2),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
