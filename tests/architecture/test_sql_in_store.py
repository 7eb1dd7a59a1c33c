"""SQL lives in ``registry/store/`` (issue 27): a statement is built (``select``, ``update``,
``delete``, ``insert``, ``func``, ``text``, ``col``...) only by the store's modules and the few
modules below that own the database itself. Everything else calls a store function.

What is not SQL stays allowed anywhere in the registry: ``Session`` and ``Engine`` (a unit of
work is opened by a route, a service or a worker and handed to the store, as in the FastAPI
template), the database's exception types, and the table definitions of the models
(``Field``, ``SQLModel``, ``Column``...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.source_tree import PACKAGES, ROOT

#: Names of sqlalchemy/sqlmodel that build or run SQL statements.
QUERY_NAMES = frozenset(
    {
        "select",
        "update",
        "delete",
        "insert",
        "func",
        "text",
        "col",
        "and_",
        "or_",
        "not_",
        "exists",
        "bindparam",
        "literal",
        "literal_column",
        "case",
        "cast",
        "tuple_",
        "union",
        "union_all",
    }
)

#: Modules outside registry/store/ that may build SQL, each for a reason.
ALLOWED = {
    # The database setup: engine, SQLite pragmas, the migration's advisory lock, transactions.
    "registry/db.py",
    # Planner statistics: ANALYZE on the engine, maintenance rather than a query of the data.
    "registry/planner.py",
}
#: Single names allowed in one module, each for a reason.
ALLOWED_NAMES = {
    # A partial index's condition is part of the table's definition (migration 0011).
    ("registry/models.py", "text"),
}
ALLOWED_FOLDERS = (
    "registry/store/",
    "registry/migrations/",  # schema changes are SQL by nature
)


def _query_imports(path: Path) -> list[str]:
    """``name`` for each SQL-building name ``path`` imports from sqlalchemy or sqlmodel (or
    the module itself, ``import sqlalchemy``, which reaches them all)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in {"sqlalchemy", "sqlmodel"}:
                found.extend(a.name for a in node.names if a.name in QUERY_NAMES)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name in {"sqlalchemy", "sqlmodel"})
    return found


def _violations(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        if relative in ALLOWED or relative.startswith(ALLOWED_FOLDERS):
            continue
        found.extend(
            f"{relative} imports {name}"
            for name in _query_imports(path)
            if (relative, name) not in ALLOWED_NAMES
        )
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_sql_is_built_only_in_the_registry_store(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    assert _violations(files) == []


def test_the_allowed_modules_exist() -> None:
    for module in ALLOWED:
        assert (ROOT / module).is_file(), f"{module} is allowed SQL but no longer exists"


def test_the_rule_catches_sql_outside_the_store(tmp_path: Path) -> None:
    offending = tmp_path / "routes.py"
    offending.write_text(
        "from sqlmodel import Session, col, select\n"
        "from sqlalchemy import Engine, func\n"
        "from sqlalchemy.exc import OperationalError\n"
        "import sqlalchemy\n"
    )
    assert _violations([offending]) == [
        "routes.py imports col",
        "routes.py imports select",
        "routes.py imports func",
        "routes.py imports sqlalchemy",
    ]
    harmless = tmp_path / "service.py"
    harmless.write_text("from sqlmodel import Session\nfrom sqlalchemy import Engine\n")
    assert _violations([harmless]) == []
