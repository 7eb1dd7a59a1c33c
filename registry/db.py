"""Database engine and schema: SQLite (WAL, busy timeout) by default, PostgreSQL by URL.

Every write runs in :func:`write_transaction` (the one transaction helper: begin as a write
transaction, commit on success, roll back on any exception), or, on a hot path written as
plain Core statements, in :func:`write_connection` (the same, on a Connection). On SQLite
that makes the transaction ``BEGIN IMMEDIATE``: writers are serialized up front instead of
failing when a read transaction tries to upgrade. On PostgreSQL row locks (``SELECT ... FOR
UPDATE`` on the counter row) do the same job where it matters.

On SQLite the writers of one process also queue on an in-process lock (the engine's *write
gate*) before ``BEGIN IMMEDIATE``. Without it, concurrent writers meet SQLite's busy
handler, which polls by sleeping 1, 2, 5 ... up to 100 ms: the write lock then stands idle
while its waiters sleep, and throughput falls as concurrency rises (EST enrollments, 16 at
a time: 57/s with p95 near 1 s; BENCHMARKS.md). The gate hands the lock over at once, in
order; writers of other processes still meet the busy handler.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from fleetcore.errors import ConfigError
from registry.errors import DatabaseUnreachableError
from registry.settings import RegistrySettings

__all__ = [
    "POOL_RESERVE",
    "DatabaseUnreachableError",
    "begin_write",
    "make_engine",
    "migrate",
    "insert_ignore",
    "unreachable",
    "write_connection",
    "write_transaction",
]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_WRITE_OPTION = "certfleet_write"
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Pooled connections beyond the worker threads: CRL signer, renewal worker, telemetry
#: flusher, planner, /healthz (each holds at most one at a time).
POOL_RESERVE = 12


#: PostgreSQL advisory lock key held while migrating ("cfmigrat" as a number).
MIGRATION_LOCK = 0x63666D6967726174

#: PostgreSQL: give up connecting after this long (an unreachable host would hang otherwise).
CONNECT_TIMEOUT_S = 5


#: SQLite engines' write gates (module doc); an engine without one writes ungated.
_WRITE_GATES: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


@contextmanager
def _write_gate(bind: Any) -> Iterator[None]:
    """Hold the write gate of SQLite engine ``bind`` for the block (re-entrant in one
    thread). After the busy timeout the block runs ungated: SQLite's own locking decides."""
    gate = _WRITE_GATES.get(bind) if isinstance(bind, Engine) else None
    if gate is None:
        yield
        return
    held = gate.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    try:
        yield
    finally:
        if held:
            gate.release()


def _configure_sqlite(engine: Engine) -> None:
    _WRITE_GATES[engine] = threading.RLock()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own transaction handling is off: we emit BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(settings: RegistrySettings) -> Engine:
    """The engine for ``settings.database_url`` (SQLite file in the data dir by default)."""
    url = settings.database_url
    # Every worker thread can hold one connection, and the background tasks have their own
    # reserve: waiting for the pool means something leaked or stalled, so it is short and
    # turns into a 503 (``database_busy``), never a hang.
    capacity = settings.registry_worker_threads + POOL_RESERVE
    pool = {
        "pool_size": min(10, capacity),
        "max_overflow": max(0, capacity - 10),
        "pool_timeout": settings.registry_db_pool_timeout_s,
    }
    if url.startswith("sqlite"):
        if not settings.registry_database_url:
            settings.layout.root.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **pool,
        )
        _configure_sqlite(engine)
        return engine
    if url.startswith(("postgresql", "postgres")):
        if url.startswith("postgres://") or url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return create_engine(
            url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}, **pool
        )
    raise ConfigError(
        f"unsupported CERTFLEET_REGISTRY_DATABASE_URL scheme in {url.split(':', 1)[0]!r}: "
        "use sqlite:///path or postgresql://user@host/db"
    )


def begin_write(session: Session) -> None:
    """Start ``session``'s transaction as a write transaction (SQLite: BEGIN IMMEDIATE).

    A read transaction the session already holds (e.g. the bearer-token lookup) is ended
    first: a read transaction cannot be turned into an IMMEDIATE one.
    """
    if session.in_transaction():
        if session.new or session.dirty or session.deleted:
            raise RuntimeError("begin_write() called with unflushed changes in the session")
        session.commit()
    session.connection(execution_options={_WRITE_OPTION: True})


@contextmanager
def write_transaction(session: Session) -> Iterator[Session]:
    """Run the block as one write transaction of ``session``: committed when the block ends,
    rolled back (releasing the write lock at once) when it raises. On SQLite the block
    holds the engine's write gate (module doc)."""
    with _write_gate(session.get_bind()):
        begin_write(session)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def write_connection(engine: Engine) -> Iterator[Connection]:
    """A Core connection whose block is one write transaction (BEGIN IMMEDIATE on SQLite,
    under the write gate): committed when the block ends, rolled back when it raises. For
    hot paths that write a few rows with plain statements (no ORM unit of work)."""
    with (
        _write_gate(engine),
        engine.connect() as connection,
    ):
        connection.execution_options(**{_WRITE_OPTION: True})
        with connection.begin():
            yield connection


def insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> bool:
    """INSERT one row unless its key exists (ON CONFLICT DO NOTHING); True when inserted.

    On PostgreSQL a concurrent insert of the same key waits for the other transaction and
    then does nothing: exactly one of two racing writers gets True.
    """
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    key = next(iter(table.primary_key.columns))
    statement = module.insert(table).values(**values).on_conflict_do_nothing().returning(key)
    # RETURNING, not rowcount: the ORM session's result has no reliable rowcount here.
    return session.execute(statement).first() is not None


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def unreachable(engine: Engine, exc: OperationalError) -> DatabaseUnreachableError:
    """The one-line error for a database that cannot be opened (no SQLAlchemy text)."""
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
    todo = (
        "check that its folder exists and is writable"
        if engine.dialect.name == "sqlite"
        else "check that the server runs and accepts us"
    )
    return DatabaseUnreachableError(
        f"cannot reach the registry database {engine.url.render_as_string(hide_password=True)}"
        f" ({reason[:200]}): {todo}, or fix --database-url / CERTFLEET_REGISTRY_DATABASE_URL"
    )


def migrate(engine: Engine, revision: str = "head") -> None:
    """Create or upgrade the schema with the Alembic migrations shipped in the package.

    Every registry command opens its database here first, so a database that cannot be
    reached is reported here, in one line (DatabaseUnreachableError).
    """
    try:
        engine.connect().close()
    except OperationalError as exc:
        raise unreachable(engine, exc) from None
    config = alembic_config()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Replicas starting together on one database migrate one after the other.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    log.info("registry schema migrated revision=%s url=%s", revision, engine.url.render_as_string())
