"""A registry database that cannot be reached is one line saying what to do, for `registry
serve` and every registry command (issue 11.9), never SQLAlchemy's text or a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.ca import CertificateAuthority
from tests.registry.test_cli import TRUST_DOMAIN, certfleet
from tests.support.ports import free_port


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    from fleetcore.layout import DataLayout

    CertificateAuthority.init(DataLayout(tmp_path / "data"), TRUST_DOMAIN)
    return tmp_path / "data"


COMMANDS = [
    ["serve", "--addr", "127.0.0.1:0"],
    ["migrate"],
    ["token", "create", "--operator", "alice"],
    ["token", "list"],
    ["token", "revoke", "--operator", "alice"],
    ["import", "MANIFEST"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c[:2]))
@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_an_unreachable_database_is_one_line_saying_what_to_do(
    command: list[str], kind: str, data_dir: Path, tmp_path: Path
) -> None:
    if kind == "postgresql":
        url = f"postgresql://certfleet:secret@127.0.0.1:{free_port()}/registry"
        hint = "check that the server runs"
    else:
        url = f"sqlite:///{tmp_path / 'no-such-folder' / 'registry.db'}"
        hint = "check that its folder exists"
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    args = [str(manifest) if a == "MANIFEST" else a for a in command]
    result = certfleet(
        "registry", *args, "--data-dir", str(data_dir), "--database-url", url, check=False
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "level=" not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("certfleet: error: cannot reach the registry database"), lines
    assert hint in lines[0] and "CERTFLEET_REGISTRY_DATABASE_URL" in lines[0]
    assert "secret" not in result.stderr  # the password is not printed
    assert "sqlalchemy" not in result.stderr.lower() and "Traceback" not in result.stderr
