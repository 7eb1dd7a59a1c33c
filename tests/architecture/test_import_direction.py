"""The architecture in one rule (STYLE.md): who may import whom.

- fleetcore imports nothing of ours (the shared core: identity, errors, settings loading,
  data layout, topics, addresses, clock, reasons, feed format);
- factory imports fleetcore (minting and provisioning);
- registry imports fleetcore and factory (it signs renewals);
- broker imports fleetcore only and talks to the registry over HTTP;
- device_sim imports fleetcore only and reaches everything else over MQTT or HTTP, as a real
  device would;
- certfleet (the operator CLI and the orchestration) may import every part.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.source_tree import PACKAGES, ROOT

OURS = set(PACKAGES)

ALLOWED: dict[str, set[str]] = {
    "fleetcore": {"fleetcore"},
    "factory": {"factory", "fleetcore"},
    "registry": {"registry", "fleetcore", "factory"},
    "broker": {"broker", "fleetcore"},
    "device_sim": {"device_sim", "fleetcore"},
    "certfleet": OURS,
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


def _violations(package: str, files: list[Path]) -> list[str]:
    """Every import in ``files`` of one of our packages that ``package`` may not import."""
    found = []
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top in OURS and top not in ALLOWED[package]:
                found.append(f"{path.name} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_architecture_allows(package: str) -> None:
    files = _package_files(package)
    assert files, f"package {package} has no modules"
    assert _violations(package, files) == []


def test_the_rule_catches_a_forbidden_import(tmp_path: Path) -> None:
    offending = tmp_path / "bad.py"
    offending.write_text(
        "from registry.models import Device\nimport broker.server\nfrom factory.ca import X\n"
        "from fleetcore.topics import RENEW\n"
    )
    assert _imports(offending) == [
        "registry.models",
        "broker.server",
        "factory.ca",
        "fleetcore.topics",
    ]
    assert _violations("broker", [offending]) == [
        "bad.py imports registry.models",
        "bad.py imports factory.ca",
    ]
    assert _violations("fleetcore", [offending]) == [
        "bad.py imports registry.models",
        "bad.py imports broker.server",
        "bad.py imports factory.ca",
    ]
    assert _violations("certfleet", [offending]) == []
