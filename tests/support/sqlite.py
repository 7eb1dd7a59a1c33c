"""A migrated SQLite registry database, made once per test process and copied per test.

Migrating a fresh file runs every Alembic revision (about 50 ms); a copy of a file migrated
once is at head, so the registry's own ``migrate`` at start-up only reads the version. The
migration tests keep running real migrations on an empty database (``database_url``).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

from registry.db import make_engine, migrate
from registry.settings import RegistrySettings


@cache
def _template() -> Path:
    """The migrated file of this process (each xdist worker makes its own)."""
    folder = Path(tempfile.mkdtemp(prefix="certfleet-sqlite-template-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "registry.db"
    settings = RegistrySettings(data_dir=folder, registry_database_url=f"sqlite:///{path}")
    engine = make_engine(settings)
    try:
        migrate(engine)
    finally:
        engine.dispose()  # the last connection closed: the WAL is checkpointed into the file
    return path


def migrated_sqlite_url(path: Path) -> str:
    """A copy of the migrated template at ``path`` (which must not exist); its URL."""
    if path.exists():
        raise FileExistsError(f"{path} exists: a migrated copy goes to a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template(), path)
    return f"sqlite:///{path}"
