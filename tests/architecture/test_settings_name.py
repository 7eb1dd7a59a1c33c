"""One name for building a part's settings (issue 27): ``build_settings(**overrides)`` in
``<part>/settings.py``, flags over ``CERTFLEET_*`` over defaults. A function that builds a
settings object under another name (``load_settings``, ``from_env``, ...) is refused."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from tests.support.source_tree import ROOT

PARTS = ("factory", "registry", "broker", "device_sim", "certfleet")
PACKAGES = ("fleetcore", *PARTS)


def _settings_builders(path: Path) -> list[str]:
    """Top-level functions of ``path`` whose return annotation names a ``*Settings`` class."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.returns is not None
        and ast.unparse(node.returns).strip("'\"").endswith("Settings")
        and not node.name.startswith("_")
    ]


def _misnamed(path: Path) -> list[str]:
    return [
        f"{path.name}: {name}"
        for name in _settings_builders(path)
        if not (
            name == "build_settings" or name.startswith("build_") and name.endswith("_settings")
        )
    ]


@pytest.mark.parametrize("part", PARTS)
def test_each_part_builds_its_settings_with_build_settings(part: str) -> None:
    module = importlib.import_module(f"{part}.settings")
    built = inspect.signature(module.build_settings).return_annotation
    settings_class = vars(module)[built] if isinstance(built, str) else built
    assert issubclass(settings_class, BaseSettings)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_settings_builder_has_another_name(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert [found for path in files for found in _misnamed(path)] == []


def test_the_rule_catches_a_misnamed_builder(tmp_path: Path) -> None:
    offending = tmp_path / "settings.py"
    offending.write_text(
        "def load_settings(**overrides) -> PartSettings: ...\n"
        "def build_settings(**overrides) -> PartSettings: ...\n"
        "def build_key_settings(**overrides) -> KeySettings: ...\n"
        "def _defaults() -> PartSettings: ...\n"
        "def from_env() -> 'PartSettings': ...\n"
    )
    assert _misnamed(offending) == ["settings.py: load_settings", "settings.py: from_env"]
