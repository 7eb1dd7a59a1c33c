"""Count test functions and assert statements under tests/ (the "no test deleted or weakened"
figure of issue 27): ``python bench/count_tests.py [folder]``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def count(folder: Path) -> tuple[int, int]:
    """(test functions, assert statements) in the Python files under ``folder``."""
    tests = asserts = 0
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
                "test_"
            ):
                tests += 1
            elif isinstance(node, ast.Assert):
                asserts += 1
    return tests, asserts


def main() -> None:
    """Print the two counts for ``tests/`` (or the folder given)."""
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent.parent / "tests"
    tests, asserts = count(folder)
    print(f"test functions: {tests}  assert statements: {asserts}")


if __name__ == "__main__":
    main()
