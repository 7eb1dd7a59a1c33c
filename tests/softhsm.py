"""A SoftHSM2 token per test: its own ``SOFTHSM2_CONF`` and token folder in tmp_path, one
initialised token and a 0600 PIN file (skips visibly, naming the Debian package softhsm2,
when it is absent). Shared by the factory and registry tests and the signing bench.

In this process the PKCS#11 library is re-initialised so that it reads the new
``SOFTHSM2_CONF`` (python-pkcs11 keeps one library object per process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SOFTHSM_MODULE", "SoftHsm", "make_softhsm", "softhsm"]

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "certfleet-test"
USER_PIN = "4321-user"
SO_PIN = "8765-so"


@dataclass(frozen=True)
class SoftHsm:
    """One SoftHSM2 token: its config (the environment a process needs), label and PIN file."""

    conf: Path
    module: str
    label: str
    pin_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def activate(self) -> None:
        """Point this process's PKCS#11 library at this token's folder."""
        import pkcs11

        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        pkcs11.lib(self.module).reinitialize()


def make_softhsm(folder: Path, label: str = TOKEN_LABEL) -> SoftHsm:
    """Initialise a token in ``folder``; pytest skip naming softhsm2 when it is missing."""
    util = shutil.which("softhsm2-util")
    if util is None or not Path(SOFTHSM_MODULE).exists():
        pytest.skip("softhsm2 not installed (apt-get install softhsm2)")
    tokens = folder / "tokens"
    tokens.mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
        timeout=30,
    )
    pin_file = folder / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    return SoftHsm(conf, SOFTHSM_MODULE, label, pin_file)


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    """A fresh token for this test, active in this process and its children."""
    hsm = make_softhsm(tmp_path / "softhsm")
    monkeypatch.setenv("SOFTHSM2_CONF", str(hsm.conf))
    hsm.activate()
    yield hsm
