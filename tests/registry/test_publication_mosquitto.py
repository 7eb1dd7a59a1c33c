"""docs/interop.md's Mosquitto recipe, checked: the CRL fetched from the publication
listener over plain HTTP, whether Mosquitto picks a new one up on SIGHUP, and what it does
with a delta CRL (nothing)."""

from __future__ import annotations

import contextlib
import getpass
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from factory.ca import write_issued
from tests.registry.publishing import Published, publishing_registry
from tests.registry.test_mosquitto_crl import MOSQUITTO, start_mosquitto
from tests.support.ports import free_port

pytestmark = pytest.mark.mosquitto


def handshake(port: int, cert: Path, key: Path, root: Path) -> None:
    """A bare mTLS handshake with Mosquitto (raises ssl.SSLError when it refuses)."""
    context = ssl.create_default_context(cafile=str(root))
    context.load_cert_chain(str(cert), str(key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.settimeout(1)
        # TLS 1.3: a refused client certificate shows up on the first read.
        with contextlib.suppress(TimeoutError):
            tls.recv(1)


def mosquitto_config(published: Published, tmp_path: Path, port: int, crl_file: Path) -> Path:
    """A Mosquitto listener on ``port`` requiring client certificates, CRL ``crl_file``."""
    server = published.ca.issue_server(
        "mosquitto", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
    )
    write_issued(
        server, tmp_path / "mq.crt", tmp_path / "mq.key", intermediate=published.ca.issuing_cert
    )
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                "persistence false",
                f"user {getpass.getuser()}",
                "log_dest stdout",
                "log_type all",
                f"listener {port} 127.0.0.1",
                f"cafile {published.layout.chain}",
                f"certfile {tmp_path / 'mq.crt'}",
                f"keyfile {tmp_path / 'mq.key'}",
                f"crlfile {crl_file}",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
                "",
            ]
        )
    )
    return config


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def test_mosquitto_follows_the_published_crl_after_sighup(
    published: Published, tmp_path: Path
) -> None:
    if not MOSQUITTO.exists():
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    cert, key = published.device("dev-mq")
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(httpx.get(f"{published.publish_url}/crl.pem", timeout=10).content)
    port = free_port()
    config = mosquitto_config(published, tmp_path, port, crl_file)
    log = tmp_path / "mosquitto.log"
    process = start_mosquitto(config, port, log)
    try:
        root = published.layout.root_cert
        handshake(port, cert, key, root)  # accepted: not on the CRL
        published.decommission("dev-mq")
        crl_file.write_bytes(httpx.get(f"{published.publish_url}/crl.pem", timeout=10).content)
        handshake(port, cert, key, root)  # still accepted: Mosquitto has the old CRL
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous: retry until refused, bounded
            try:
                handshake(port, cert, key, root)
            except ssl.SSLError as exc:
                assert "certificate revoked" in str(exc), log.read_text()
                break
            assert time.monotonic() < deadline, f"no reload on SIGHUP: {log.read_text()}"
            time.sleep(0.1)
    finally:
        stop(process)


def test_mosquitto_reads_the_base_crl_and_ignores_the_delta(tmp_path: Path) -> None:
    """docs/interop.md: Mosquitto verifies with X509_V_FLAG_CRL_CHECK only, never
    X509_V_FLAG_USE_DELTAS, so a delta CRL in its crlfile is ignored (and harmless): a
    device revoked in the base is refused, one revoked since only in the delta is admitted
    until the next base. Relying parties like it lag by the base interval."""
    if not MOSQUITTO.exists():
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    with publishing_registry(tmp_path, registry_crl_per_change_entries=0) as published:
        in_base, in_base_key = published.device("dev-in-base")
        in_delta, in_delta_key = published.device("dev-in-delta")
        published.decommission("dev-in-base")
        base = httpx.get(f"{published.publish_url}/crl.pem", timeout=10).content
        published.decommission("dev-in-delta")
        delta = httpx.get(f"{published.publish_url}/delta-crl.pem", timeout=10).content
        assert b"BEGIN X509 CRL" in delta
        crl_file = tmp_path / "crl.pem"
        crl_file.write_bytes(base + delta)  # both CRLs in one file, as an operator might
        port = free_port()
        log = tmp_path / "mosquitto.log"
        process = start_mosquitto(mosquitto_config(published, tmp_path, port, crl_file), port, log)
        try:
            root = published.layout.root_cert
            with pytest.raises(ssl.SSLError, match="certificate revoked"):
                handshake(port, in_base, in_base_key, root)
            handshake(port, in_delta, in_delta_key, root)  # admitted: the delta is not read
        finally:
            stop(process)
