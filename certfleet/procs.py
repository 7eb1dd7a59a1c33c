"""Child processes for `certfleet demo` and `certfleet up`: start, wait until ready, stop.

A service is started as ``certfleet <part> serve ... --ready-file F`` in its own session
(so a Ctrl-C on the terminal reaches us, and we decide the order things stop), its output
going to a log file. It is ready when F holds JSON; it is stopped by PID (SIGTERM, then
SIGKILL after a grace period). :class:`ProcessGroup` stops everything it started, in
reverse order, whatever happens; and when this process itself is SIGKILLed, the kernel
sends each child SIGTERM (:func:`fleetcore.children.exit_with_parent`), so none is left
orphaned holding its port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certfleet.errors import OrchestrationError
from fleetcore.children import exit_with_parent

__all__ = [
    "ISOLATED_ENV",
    "ManagedProcess",
    "OrchestrationError",
    "ProcessGroup",
    "certfleet_argv",
    "create_claim",
    "free_port",
    "provision_fleet",
    "terminate_on_sigterm",
]

log = logging.getLogger(__name__)

#: For a self-contained run (the demo, `sim lifecycle`): its processes use only its own data
#: folder, whatever the caller's environment says.
ISOLATED_ENV = {
    # Such a run goes beside whatever else runs here: an ephemeral metrics port, not 9883.
    "CERTFLEET_BROKER_METRICS_ADDR": "127.0.0.1:0",
    "CERTFLEET_CA_PASSPHRASE": "",
    "CERTFLEET_REGISTRY_DATABASE_URL": "",
    "CERTFLEET_REGISTRY_TOKEN": "",
    "CERTFLEET_REGISTRY_URL": "",
}


def certfleet_argv(*args: str) -> list[str]:
    """The command line that runs ``certfleet <args>`` with this interpreter."""
    return [sys.executable, "-m", "certfleet.cli", *args]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a listener another process must know first)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def provision_fleet(
    data_dir: Path,
    count: int,
    *,
    registry_url: str,
    broker_addr: str,
    lifetime: str | None = None,
    stagger: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """``certfleet factory provision`` of ``count`` devices into ``data_dir``, registered with
    the registry at ``registry_url`` as service/factory; its JSON summary."""
    argv = certfleet_argv(
        "factory", "provision", "--count", str(count), "--registry", registry_url,
        "--client", "factory", "--broker", broker_addr, "--data-dir", str(data_dir), "--json",
    )  # fmt: skip
    if lifetime is not None:
        argv += ["--lifetime", lifetime]
    if stagger is not None:
        argv += ["--stagger", stagger]
    return _certfleet_json(argv, "provisioning", env, timeout)


def create_claim(
    data_dir: Path,
    batch: str,
    *,
    quota: int,
    allow_file: Path,
    registry_url: str,
    expires: str = "1d",
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """``certfleet factory claim create`` for ``batch`` into ``data_dir/claims/<batch>/``,
    recorded in the registry at ``registry_url``; its JSON summary."""
    argv = certfleet_argv(
        "factory", "claim", "create", "--batch", batch, "--quota", str(quota),
        "--expires", expires, "--allow-file", str(allow_file), "--registry", registry_url,
        "--data-dir", str(data_dir), "--json",
    )  # fmt: skip
    return _certfleet_json(argv, "claim creation", env, timeout)


def _certfleet_json(
    argv: list[str], what: str, env: dict[str, str] | None, timeout: float
) -> dict[str, Any]:
    completed = subprocess.run(  # noqa: S603  (our own CLI, fixed arguments)
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if completed.returncode != 0:
        raise OrchestrationError(
            f"{what} failed (exit {completed.returncode}): {completed.stderr.strip()[-2000:]}"
        )
    try:
        summary: dict[str, Any] = json.loads(completed.stdout)
    except ValueError:
        raise OrchestrationError(
            f"{what} printed no JSON summary: {completed.stdout[-500:]}"
        ) from None
    return summary


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


@dataclass
class ManagedProcess:
    """One child process we started, with its log and (once ready) its ready-file JSON."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return _tail(self.log_path, lines)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            log.info("stopping process name=%s pid=%d", self.name, self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("process did not stop; killing name=%s pid=%d", self.name, self.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        return self.popen.returncode


class ProcessGroup:
    """Starts services and always stops them (reverse order) when the block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception:  # keep stopping the others whatever happens
                log.exception("stopping process failed name=%s pid=%d", process.name, process.pid)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        ready_file: Path,
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` and wait until ``ready_file`` holds JSON (bounded by ``timeout``)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ready_file.unlink(missing_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=exit_with_parent(),
                env={**os.environ, **(env or {})},
            )
        process = ManagedProcess(name, popen, log_path)
        self.processes.append(process)
        log.info("process started name=%s pid=%d", name, popen.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise OrchestrationError(
                    f"{name} exited with code {popen.returncode} before it was ready; "
                    f"its log ({log_path}) ends with:\n{process.log_tail()}"
                )
            try:
                process.ready = json.loads(ready_file.read_text())
                return process
            except (OSError, ValueError):
                time.sleep(0.05)
        raise OrchestrationError(
            f"{name} was not ready within {timeout:.0f}s; its log ({log_path}) ends with:\n"
            f"{process.log_tail()}"
        )

    def start_registry(
        self, data_dir: Path, addr: str, *, telemetry_broker: str, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        """``certfleet registry serve`` on ``addr``, subscribed to the broker's telemetry."""
        ready_file = data_dir / "registry.ready.json"
        argv = certfleet_argv(
            "registry", "serve", "--data-dir", str(data_dir), "--addr", addr,
            "--ready-file", str(ready_file), "--telemetry-broker", telemetry_broker,
        )  # fmt: skip
        return self.start("registry", argv, ready_file, env=env)

    def start_broker(
        self,
        data_dir: Path,
        addr: str,
        *,
        registry_url: str,
        node: str = "broker",
        env: dict[str, str] | None = None,
        name: str = "broker",
    ) -> ManagedProcess:
        """``certfleet broker serve`` on ``addr`` as broker node ``node``, following
        ``registry_url``'s revocations; its ready file is ``broker-<node>.ready.json`` so
        several nodes can share one data folder."""
        ready_file = data_dir / f"broker-{node}.ready.json"
        argv = certfleet_argv(
            "broker", "serve", "--data-dir", str(data_dir), "--addr", addr,
            "--registry-url", registry_url, "--ready-file", str(ready_file),
        )  # fmt: skip
        node_env = {**(env or {}), "CERTFLEET_BROKER_NODE": node}
        return self.start(name, argv, ready_file, env=node_env)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) inside the block, so ``finally`` clauses run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
