"""Errors raised on purpose are ours (issue 27): every exception class of the product lives in
its part's ``errors.py`` under ``CertfleetError`` (a reader finds a part's refusals in one
tree), and every ``raise`` names one of them, or a builtin on the short list below.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
from pathlib import Path
from types import ModuleType

import click
import pytest
from amqtt.errors import MQTTError, NoDataError
from fastapi import HTTPException

from fleetcore.errors import CertfleetError
from tests.support.source_tree import PACKAGES, ROOT

#: Foreign exceptions a raise may name (or a function return, to be raised), each for a reason.
ALLOWED_FOREIGN: dict[type[BaseException], str] = {
    ValueError: "a value object's own check (dataclass __post_init__, pydantic validators, "
    "which turn it into a ValidationError), or a parse failure its caller catches beside the "
    "parser's own ValueError",
    ConnectionError: "a socket failure the device's connection code catches with OSError",
    RuntimeError: "an invariant broken by a bug, never a message to a person",
    AssertionError: "unreachable code",
    ImportError: "at import: an installed dependency lacks what we rely on (paho's hook)",
    SystemExit: "ending the process from a signal handler",
    click.exceptions.Exit: "a command's exit status (typer.Exit)",
    HTTPException: "FastAPI's answer to a refused credential (registry.auth.refuse)",
    MQTTError: "amqtt's signal that ends a client's connection (broker/gate.py)",
    NoDataError: "amqtt's signal that a client's stream ended (broker/gate.py)",
}

#: Exception classes still outside their part's errors.py, each for a reason (none now).
PENDING: set[str] = set()


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _product_files() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts
    ]


def _exception_classes(module: ModuleType) -> list[type[BaseException]]:
    """The exception classes ``module`` defines (not those it imports)."""
    return [
        cls
        for cls in vars(module).values()
        if inspect.isclass(cls)
        and issubclass(cls, BaseException)
        and cls.__module__ == module.__name__
    ]


def _misplaced(module: ModuleType) -> list[str]:
    """``module.Class`` for each exception class defined outside ``<part>.errors`` or not
    under CertfleetError."""
    part = module.__name__.split(".")[0]
    found = []
    for cls in _exception_classes(module):
        name = f"{module.__name__}.{cls.__name__}"
        if name in PENDING:
            continue
        if module.__name__ != f"{part}.errors":
            found.append(f"{name} is defined outside {part}/errors.py")
        elif not issubclass(cls, CertfleetError):
            found.append(f"{name} is not a CertfleetError")
    return found


def _raised_names(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of what each ``raise`` raises: the called name of ``raise X(...)``,
    or the name of ``raise X``; bare re-raises and ``raise exc`` of a caught variable give the
    variable's name (resolved, or not, by the caller)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name | ast.Attribute):
                found.append((node.lineno, ast.unparse(target)))
    return found


def _resolve(module: ModuleType, dotted: str) -> object:
    first, *rest = dotted.split(".")
    value: object = vars(module).get(first, getattr(builtins, first, None))
    for part in rest:
        value = getattr(value, part, None)
    return value


def _allowed(cls: type) -> bool:
    return issubclass(cls, (CertfleetError, *ALLOWED_FOREIGN))


def _ours(value: object, module: ModuleType) -> bool | None:
    """True: a CertfleetError class or an allowed foreign one, or a function annotated to
    return one; False: another class or function; None: not resolvable at module level (a
    local variable: a caught exception raised again)."""
    if inspect.isclass(value):
        return _allowed(value)
    if inspect.isfunction(value):
        returns = value.__annotations__.get("return")
        if isinstance(returns, str):
            returns = _resolve(inspect.getmodule(value) or module, returns)
        return inspect.isclass(returns) and _allowed(returns)
    return None


def _bad_raises(module: ModuleType, source: str) -> list[str]:
    found = []
    for line, dotted in _raised_names(source):
        verdict = _ours(_resolve(module, dotted), module)
        if verdict is False:
            found.append(f"{module.__name__}:{line} raises {dotted}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_exception_classes_live_in_errors_modules_under_certfleet_error(package: str) -> None:
    files = [path for path in _product_files() if path.parts[len(ROOT.parts)] == package]
    assert files, f"package {package} has no modules"
    found = []
    for path in files:
        found.extend(_misplaced(importlib.import_module(_module_name(path))))
    assert found == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_raise_names_a_certfleet_error_or_an_allowed_builtin(package: str) -> None:
    files = [path for path in _product_files() if path.parts[len(ROOT.parts)] == package]
    found = []
    for path in files:
        module = importlib.import_module(_module_name(path))
        found.extend(_bad_raises(module, path.read_text()))
    assert found == []


def test_pending_classes_still_exist() -> None:
    for dotted in PENDING:
        module_name, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module_name), name), f"{dotted} is gone"


def _planted(name: str, source: str) -> ModuleType:
    module = ModuleType(name)
    exec(compile(source, f"{name}.py", "exec"), vars(module))  # noqa: S102 - our own text
    return module


PLANTED = """
from fleetcore.errors import CertfleetError, ConfigError

class LocalError(Exception):
    pass

class OursButHere(CertfleetError):
    pass

def refusal() -> ConfigError:
    return ConfigError("x")

def stray() -> Exception:
    return KeyError("x")

def run(flag):
    try:
        raise ConfigError("fine")
    except ConfigError as exc:
        raise exc
    raise refusal()
    raise ValueError("a value check")
    raise LocalError("not ours")
    raise KeyError("a builtin off the list")
    raise stray()
"""


def test_the_rules_catch_planted_offenders() -> None:
    module = _planted("registry.somewhere", PLANTED)
    assert sorted(_misplaced(module)) == [
        "registry.somewhere.LocalError is defined outside registry/errors.py",
        "registry.somewhere.OursButHere is defined outside registry/errors.py",
    ]
    assert _bad_raises(module, PLANTED) == [
        "registry.somewhere:23 raises LocalError",
        "registry.somewhere:24 raises KeyError",
        "registry.somewhere:25 raises stray",
    ]
    errors_module = _planted("registry.errors", PLANTED)
    assert _misplaced(errors_module) == ["registry.errors.LocalError is not a CertfleetError"]
