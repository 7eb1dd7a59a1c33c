"""`certfleet registry serve` as a real process for fault tests: started, SIGKILLed,
restarted on the same database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import TestPKI

__all__ = ["RegistryProcess", "registry_process"]


@dataclass
class RegistryProcess:
    process: subprocess.Popen[bytes]
    url: str

    def kill(self) -> None:
        """SIGKILL, by PID: no shutdown code of ours runs."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@contextmanager
def registry_process(pki: TestPKI, database_url: str, ready: Path) -> Iterator[RegistryProcess]:
    ready.unlink(missing_ok=True)
    env = {
        **os.environ,
        "CERTFLEET_REGISTRY_DATABASE_URL": database_url,
        "CERTFLEET_LOG_LEVEL": "warning",
        "CERTFLEET_REGISTRY_VERIFY_PROCESSES": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "certfleet.cli", "registry", "serve",
         "--data-dir", str(pki.layout.root), "--addr", "127.0.0.1:0",
         "--ready-file", str(ready)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, "registry exited before it was ready"
            assert time.monotonic() < deadline, "registry did not write its ready file"
            time.sleep(0.05)
        yield RegistryProcess(process, str(json.loads(ready.read_text())["url"]))
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
