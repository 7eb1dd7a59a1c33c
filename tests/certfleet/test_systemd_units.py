"""contrib/systemd: the registry and broker units pass ``systemd-analyze verify`` without a
warning, keep their sandboxing, and the sample config names only real settings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from certfleet.cli import _settings_classes
from fleetcore.config import config_file_values, unknown_settings

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNITS = ["certfleet-registry.service", "certfleet-broker.service"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SANDBOX = [
    "User=certfleet",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "CapabilityBoundingSet=",
    "SystemCallFilter=@system-service",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
]


def verify(units: list[Path], tmp_path: Path) -> str:
    """``systemd-analyze verify`` on copies whose ExecStart is this venv's certfleet (the
    unit's /usr/local/bin path does not exist here); its complaints, empty when clean."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    certfleet = Path(sys.executable).parent / "certfleet"
    copies = []
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/certfleet", str(certfleet)))
        copies.append(str(copy))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *copies], capture_output=True, text=True, timeout=60
    )
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (rc)")


def test_units_pass_systemd_analyze_verify_cleanly(tmp_path: Path) -> None:
    assert verify([CONTRIB / unit for unit in UNITS], tmp_path) == ""


def test_verify_catches_a_misspelt_directive(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "certfleet-registry.service"
    broken.parent.mkdir()
    broken.write_text(
        (CONTRIB / UNITS[0]).read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
    )
    assert "Unknown key 'ProtectSystm'" in verify([broken], tmp_path)


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_sandboxed(unit: str) -> None:
    lines = (CONTRIB / unit).read_text().splitlines()
    for directive in SANDBOX:
        assert directive in lines, f"{unit} lacks {directive}"
    assert any(line.startswith("ReadWritePaths=/var/lib/certfleet") for line in lines)


def test_broker_writes_only_its_own_state() -> None:
    lines = (CONTRIB / "certfleet-broker.service").read_text().splitlines()
    assert "ReadWritePaths=/var/lib/certfleet/broker" in lines
    assert "StateDirectory=certfleet/broker" in lines


def test_sample_config_names_only_real_settings() -> None:
    values = config_file_values(CONTRIB / "certfleet.toml")
    assert values["broker_metrics_addr"] == "127.0.0.1:9883"
    assert unknown_settings(_settings_classes(), environ={}, file_values=values) == []
