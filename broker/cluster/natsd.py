"""A local nats-server (the Debian binary) with JetStream and authentication on.

For `certfleet up --brokers N` without a cluster URL, for the tests and the benchmarks:
one place knows how certfleet runs its own NATS. :class:`LocalNats` writes a config file
(loopback only, JetStream in the given folder, a user and a generated password; the file
and the credentials file 0600), starts ``nats-server`` and learns the port it chose (port 0
= ephemeral, through nats-server's ports file), and stops it by PID. ``restart()`` starts it
again on the same port and store (a NATS restart, for fault tests).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from broker.errors import BrokerError
from fleetcore.children import exit_with_parent
from fleetcore.layout import write_private

__all__ = ["INSTALL_HINT", "LocalNats", "NatsCredentials", "find_nats_server"]

#: What to tell a person whose machine has no nats-server.
INSTALL_HINT = "apt install nats-server"
_DEBIAN_PATH = Path("/usr/sbin/nats-server")
_USER = "certfleet"


def find_nats_server() -> Path | None:
    """The nats-server binary (PATH, then Debian's /usr/sbin), None when absent."""
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    return _DEBIAN_PATH if _DEBIAN_PATH.exists() else None


class NatsCredentials:
    """The user and password the nodes use, kept in a 0600 file beside the config."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self.password = password

    def __repr__(self) -> str:
        return f"NatsCredentials(user={self.user!r}, password=***)"

    @classmethod
    def load_or_create(cls, path: Path) -> NatsCredentials:
        if path.exists():
            stored = json.loads(path.read_text())
            return cls(str(stored["user"]), str(stored["password"]))
        created = cls(_USER, secrets.token_urlsafe(24))
        stored = {"user": created.user, "password": created.password}
        write_private(path, json.dumps(stored).encode())
        return created


class LocalNats:
    """A nats-server process of ours, with JetStream in ``folder / "jetstream"``."""

    def __init__(
        self,
        folder: Path,
        *,
        port: int = 0,
        binary: Path | None = None,
        nkey_user: str | None = None,
    ) -> None:
        """``nkey_user``: authenticate that NKey user (its public key) instead of the
        generated user/password."""
        found = binary or find_nats_server()
        if found is None:
            raise BrokerError(f"nats-server is not installed ({INSTALL_HINT})")
        self.binary = found
        self.folder = folder
        self.port = port
        self.credentials = NatsCredentials.load_or_create(folder / "nats-credentials.json")
        self.nkey_user = nkey_user
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        store = self.folder / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        listen = self.port if self.port else -1
        config = (
            f"listen: 127.0.0.1:{listen}\n"
            f'server_name: "certfleet-nats"\n'
            f'jetstream {{ store_dir: "{store}" }}\n'
            f'ports_file_dir: "{self.folder}"\n' + self._authorization()
        )
        path = self.folder / "nats-server.conf"
        write_private(path, config.encode())
        return path

    def _authorization(self) -> str:
        if self.nkey_user is not None:
            return f"authorization {{ users: [ {{ nkey: {json.dumps(self.nkey_user)} }} ] }}\n"
        return (
            f"authorization {{ user: {json.dumps(self.credentials.user)}, "
            f"password: {json.dumps(self.credentials.password)} }}\n"
        )

    def start(self, timeout: float = 15.0) -> LocalNats:
        """Start nats-server and wait until it accepts TCP connections."""
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        log_path = self.folder / "nats-server.log"
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [str(self.binary), "-c", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=exit_with_parent(),
            )
        ports_file = self.folder / f"{self.binary.name}_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"nats-server exited with {self.process.returncode}; see {log_path}"
                )
            if not self.port and ports_file.exists():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                    self.port = int(urls[0].rsplit(":", 1)[1])
                except (ValueError, KeyError, IndexError):
                    pass
            if self.port and _accepts(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"nats-server did not listen within {timeout}s; see {log_path}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or SIGKILL with ``kill``) and wait for it, by PID."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        (self.folder / f"{self.binary.name}_{process.pid}.ports").unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop and start again on the same port and JetStream store."""
        self.stop()
        self.start()

    def __enter__(self) -> LocalNats:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
