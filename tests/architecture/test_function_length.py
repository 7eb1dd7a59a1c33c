"""No function of the product packages is over 100 lines (issue 27): a longer one is a list
of steps waiting for names. The count runs from the ``def`` line (decorators excluded) to the
function's last line, docstring and signature included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.source_tree import PACKAGES, ROOT

MAX_LINES = 100


def _long_functions(path: Path, max_lines: int = MAX_LINES) -> list[str]:
    """``file:line name (N lines)`` for each function in ``path`` longer than ``max_lines``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > max_lines:
                found.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_over_100_lines(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    assert [found for path in files for found in _long_functions(path)] == []


def test_the_rule_catches_a_long_function(tmp_path: Path) -> None:
    offending = tmp_path / "long.py"
    # ``fits``: its def line and 99 statements, exactly the bound; ``too_long`` one line more.
    fits = "".join(f"    x{i} = {i}\n" for i in range(99))
    too_long = "".join(f"        x{i} = {i}\n" for i in range(100))
    offending.write_text(
        f"def fits():\n{fits}\n\nclass Holder:\n    async def too_long(self):\n{too_long}"
    )
    assert _long_functions(offending) == ["long.py:104 too_long (101 lines)"]
    assert _long_functions(offending, max_lines=99) == [
        "long.py:1 fits (100 lines)",
        "long.py:104 too_long (101 lines)",
    ]
