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

from tests.support.pki import TestPKI

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
def registry_process(
    pki: TestPKI,
    database_url: str,
    ready: Path,
    *,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
) -> Iterator[RegistryProcess]:
    """``certfleet registry serve`` on ``database_url`` (data folder: the session CA's, or
    ``data_dir``), with ``env`` added to its environment and its log in ``log_file`` (else
    discarded); SIGTERMed when the block ends."""
    ready.unlink(missing_ok=True)
    environment = {
        **os.environ,
        "CERTFLEET_REGISTRY_DATABASE_URL": database_url,
        "CERTFLEET_LOG_LEVEL": "warning",
        "CERTFLEET_REGISTRY_VERIFY_PROCESSES": "0",
        **(env or {}),
    }
    stderr = log_file.open("ab") if log_file is not None else None
    process = subprocess.Popen(
        [sys.executable, "-m", "certfleet.cli", "registry", "serve",
         "--data-dir", str(data_dir or pki.layout.root), "--addr", "127.0.0.1:0",
         "--ready-file", str(ready)],
        env=environment, stdout=subprocess.DEVNULL,
        stderr=stderr if stderr is not None else subprocess.DEVNULL,
    )  # fmt: skip
    if stderr is not None:
        stderr.close()  # the child has its own copy
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
