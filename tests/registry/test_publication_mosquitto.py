"""docs/interop.md's Mosquitto recipe, checked: the CRL fetched from the publication
listener over plain HTTP, and whether Mosquitto picks a new one up on SIGHUP."""

from __future__ import annotations

import contextlib
import getpass
import signal
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from factory.ca import write_issued
from tests.registry.publishing import Published
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


def test_mosquitto_follows_the_published_crl_after_sighup(
    published: Published, tmp_path: Path
) -> None:
    if not MOSQUITTO.exists():
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    cert, key = published.device("dev-mq")
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(httpx.get(f"{published.publish_url}/crl.pem", timeout=10).content)
    server = published.ca.issue_server(
        "mosquitto", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
    )
    write_issued(
        server, tmp_path / "mq.crt", tmp_path / "mq.key", intermediate=published.ca.issuing_cert
    )
    port = free_port()
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
        process.terminate()
        try:
            process.wait(10)
        except Exception:
            process.kill()
            process.wait(10)
