"""The factory is pure PKI: it imports nothing of certfleet's other parts."""

from __future__ import annotations

import ast
from pathlib import Path

import factory

OTHER_PARTS = ("registry", "broker", "device_sim", "certfleet")


def test_factory_imports_no_other_part() -> None:
    offenders: list[str] = []
    for source in Path(factory.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{source.name}: {name}" for name in names if name.split(".")[0] in OTHER_PARTS
            ]
    assert offenders == []
