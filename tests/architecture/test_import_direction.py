"""The architecture in one rule (STYLE.md): who may import whom.

- factory imports nothing of ours (pure PKI);
- registry may import factory;
- broker imports factory and talks to the registry over HTTP only;
- every part may import factory.topics (the MQTT topic names);
- device_sim imports only key/CSR/profile helpers and the settings loader from factory and
  reaches everything else over MQTT or HTTP, as a real device would.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"factory", "registry", "broker", "device_sim", "certfleet"}

ALLOWED: dict[str, set[str]] = {
    "factory": {"factory"},
    "registry": {"registry", "factory"},
    "broker": {"broker", "factory"},
    "device_sim": {"device_sim", "factory"},
}
#: device_sim may take only these factory modules (what firmware would link in).
DEVICE_SIM_FACTORY_MODULES = {
    "factory.keys",
    "factory.profile",
    "factory.errors",
    "factory.layout",
    "factory.config",  # the settings loader every part shares
    "factory.address",  # the host:port type every settings object uses
    "factory.topics",  # the MQTT topic names every part shares
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_architecture_allows(package: str) -> None:
    files = _package_files(package)
    assert files, f"package {package} has no modules"
    violations = []
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top in OURS and top not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
            if (
                package == "device_sim"
                and top == "factory"
                and name not in DEVICE_SIM_FACTORY_MODULES | {"factory"}
            ):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def test_the_rule_catches_a_forbidden_import(tmp_path: Path) -> None:
    offending = tmp_path / "bad.py"
    offending.write_text("from registry.models import Device\nimport broker.server\n")
    assert _imports(offending) == ["registry.models", "broker.server"]
