"""`certfleet registry ...` as an operator runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from factory.ca import CertificateAuthority, IssuedCertificate, write_issued
from fleetcore.keys import generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, serial_hex
from registry import importer
from tests.support.processes import certfleet_in_process

TRUST_DOMAIN = "cli.test"


def certfleet(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`certfleet ARGS` in process (output and exit code only; serve runs as a real process)."""
    result = certfleet_in_process(*args, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@dataclass
class ServedRegistry:
    """A `certfleet registry serve` subprocess; ``stdout``/``stderr`` filled once it stopped."""

    process: subprocess.Popen[str]
    url: str
    ready_info: dict[str, object]
    stdout: str = ""
    stderr: str = ""


@contextmanager
def served_registry(data: str, ready: Path) -> Iterator[ServedRegistry]:
    """Run `certfleet registry serve` until the block ends, then SIGTERM it (by PID)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "certfleet.cli", "registry", "serve", "--data-dir", data,
         "--addr", "127.0.0.1:0", "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    served = ServedRegistry(process, "", {})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "registry did not write its ready file"
            time.sleep(0.05)
        served.ready_info = json.loads(ready.read_text())
        served.url = str(served.ready_info["url"])
        yield served
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            served.stdout, served.stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            served.stdout, served.stderr = process.communicate()


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(DataLayout(tmp_path / "data"), TRUST_DOMAIN)


def manifest_line(issued: IssuedCertificate, device_id: str, hardware_serial: str) -> str:
    cert = issued.certificate
    return json.dumps(
        {
            "device_id": device_id,
            "hardware_serial": hardware_serial,
            "serial": serial_hex(cert.serial_number),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "issued_at": cert.not_valid_before_utc.isoformat(),
            "certificate_pem": issued.certificate_pem.decode(),
            "batch_id": "b1",
        }
    )


def test_import_manifest_is_idempotent(ca: CertificateAuthority, database_url: str) -> None:
    manifest = ca.layout.manifest
    lines = []
    for i in range(3):
        device_id = f"imp-{i}"
        lines.append(
            manifest_line(
                ca.issue_client(ca.identity(IdentityKind.DEVICE, device_id)), device_id, f"HW-{i}"
            )
        )
    manifest.write_text("\n".join(lines) + "\n")
    args = [
        "registry",
        "import",
        str(manifest),
        "--data-dir",
        str(ca.layout.root),
        "--database-url",
        database_url,
        "--json",
    ]
    assert json.loads(certfleet(*args).stdout) == {"created": 3, "existing": 0}
    assert json.loads(certfleet(*args).stdout) == {"created": 0, "existing": 3}


def test_import_names_the_bad_line(ca: CertificateAuthority, tmp_path: Path) -> None:
    manifest = tmp_path / "bad.jsonl"
    good = manifest_line(ca.issue_client(ca.identity(IdentityKind.DEVICE, "ok-1")), "ok-1", "HW")
    manifest.write_text(good + "\n{not json\n")
    result = certfleet(
        "registry", "import", str(manifest), "--data-dir", str(ca.layout.root), check=False
    )
    assert result.returncode == 2
    assert f"{manifest}:2: not a manifest record" in result.stderr


def test_a_large_manifest_is_parsed_by_workers_in_order(
    ca: CertificateAuthority, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above PARALLEL_MIN_BYTES (0 here) worker processes parse the lines: a bad line is
    named with its number, the batches before it are registered and the rest are not."""
    monkeypatch.setattr(importer, "PARALLEL_MIN_BYTES", 0)
    key = generate_key().public_key()
    lines = [
        manifest_line(
            ca.issue_client(ca.identity(IdentityKind.DEVICE, f"par-{i}"), public_key=key),
            f"par-{i}",
            f"HW-{i}",
        )
        for i in range(2100)
    ]
    manifest = ca.layout.root / "large.jsonl"
    manifest.write_text("\n".join([*lines[:1500], "{not json", *lines[1500:]]) + "\n")
    args = ["registry", "import", str(manifest), "--data-dir", str(ca.layout.root),
            "--database-url", database_url, "--json"]  # fmt: skip
    result = certfleet(*args, check=False)
    assert result.returncode == 2
    assert f"{manifest}:1501: not a manifest record" in result.stderr
    manifest.write_text("\n".join(lines) + "\n")
    assert json.loads(certfleet(*args).stdout) == {"created": 1100, "existing": 1000}


def test_token_create_prints_a_token_that_works_and_migrate_is_repeatable(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    data = str(ca.layout.root)
    assert "schema up to date" in certfleet("registry", "migrate", "--data-dir", data).stdout
    certfleet("registry", "migrate", "--data-dir", data)
    token = certfleet(
        "registry", "token", "create", "--operator", "ops-bot", "--data-dir", data
    ).stdout.strip()
    assert token.startswith("cfr_")
    assert token not in ca.layout.registry_db.read_bytes().decode("latin-1")
    refused = certfleet(
        "registry", "token", "create", "--operator", "bad name", "--data-dir", data, check=False
    )
    assert refused.returncode == 2
    assert "operator name 'bad name' is not valid" in refused.stderr

    ready = tmp_path / "ready.json"
    with served_registry(data, ready) as served:
        info = served.ready_info
        assert info["pid"] == served.process.pid
        assert served.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(ca.layout.root_cert))
        with httpx.Client(base_url=served.url + "/api/v1", verify=context) as http:
            assert http.get("/healthz").json()["status"] == "ok"
            with_token = http.get("/devices", headers={"Authorization": f"Bearer {token}"})
            assert with_token.status_code == 200
            assert http.get("/devices").status_code == 401
        # the CLI server runs on uvloop: the peer certificate must reach the app there too
        operator = ca.issue_client(ca.identity(IdentityKind.OPERATOR, "cli-op"))
        write_issued(operator, tmp_path / "op.crt", tmp_path / "op.key")
        mtls = ssl.create_default_context(cafile=str(ca.layout.root_cert))
        mtls.load_cert_chain(str(tmp_path / "op.crt"), str(tmp_path / "op.key"))
        with httpx.Client(base_url=served.url + "/api/v1", verify=mtls) as http:
            assert http.get("/devices").status_code == 200
    assert served.url in served.stdout
    assert served.process.returncode == 0
    assert not ready.exists()


def test_serve_without_a_ca_says_what_to_do(tmp_path: Path) -> None:
    result = certfleet(
        "registry",
        "serve",
        "--data-dir",
        str(tmp_path / "empty"),
        "--addr",
        "127.0.0.1:0",
        check=False,
    )
    assert result.returncode == 2
    assert "run 'certfleet ca init' first" in result.stderr


def test_serve_releases_open_long_polls_when_stopped(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    data = str(ca.layout.root)
    token = certfleet(
        "registry", "token", "create", "--operator", "feed-op", "--data-dir", data
    ).stdout.strip()
    poll_status: list[int] = []
    with served_registry(data, tmp_path / "ready.json") as served:
        url = served.url
        context = ssl.create_default_context(cafile=str(ca.layout.root_cert))
        headers = {"Authorization": f"Bearer {token}"}

        def long_poll() -> None:
            with httpx.Client(base_url=url + "/api/v1", verify=context, timeout=60) as http:
                poll_status.append(
                    http.get(
                        "/revocations", params={"after": 0, "wait": 50}, headers=headers
                    ).status_code
                )

        poller = threading.Thread(target=long_poll)
        poller.start()
        with httpx.Client(base_url=url + "/api/v1", verify=context) as http:
            # the long-poll is parked once the registry counts a waiter on its feed
            deadline = time.monotonic() + 20
            while (
                "certfleet_registry_feed_waiters 1.0"
                not in http.get("/metrics", headers=headers).text
            ):
                assert time.monotonic() < deadline, "long-poll never parked"
                time.sleep(0.05)
    poller.join(20)
    assert poll_status == [200]
    assert served.process.returncode == 0
    assert "graceful shutdown exceeded" not in served.stderr
    assert "Traceback" not in served.stderr
