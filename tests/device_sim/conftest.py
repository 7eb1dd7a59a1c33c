"""Fixtures for the simulator: device bundles from the session CA and a real Mosquitto broker
over mTLS (trusting ca/chain.pem), started on a free loopback port and killed by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.server import BrokerServer
from factory.ca import CertificateAuthority, RevokedEntry
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout, write_public
from tests.support.pki import Fleet, TestPKI, write_device_bundle
from tests.support.ports import free_port
from tests.support.servers import certfleet_broker_settings
from tests.support.waits import wait_listening

# Re-exported for older imports (``from tests.device_sim.conftest import free_port``).
__all__ = [
    "Fleet",
    "certfleet_broker_settings",
    "free_port",
    "wait_listening",
    "write_device_bundle",
]


@pytest.fixture(scope="session")
def fleet(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    data_dir = tmp_path_factory.mktemp("sim-fleet")
    serials = {
        f"dev-{i:04d}": write_device_bundle(pki.ca, data_dir, f"dev-{i:04d}") for i in range(60)
    }
    return Fleet(data_dir, serials)


@pytest.fixture(scope="session")
def foreign_fleet(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Bundles from a different CA (same trust domain name): the broker must refuse them."""
    data_dir = tmp_path_factory.mktemp("foreign-fleet")
    ca = CertificateAuthority.init(DataLayout(tmp_path_factory.mktemp("foreign-ca")), "fleet.test")
    serial = write_device_bundle(ca, data_dir, "dev-foreign")
    # The device trusts OUR root (it reaches our broker), but its certificate is foreign.
    write_public(data_dir / "devices" / "dev-foreign" / "root.crt", pki.ca.root_pem)
    return Fleet(data_dir, {"dev-foreign": serial})


@dataclass
class Mosquitto:
    port: int
    process: subprocess.Popen[bytes]
    config: Path
    log: Path

    def connections(self) -> int:
        """How many client connections it has accepted so far (from its log)."""
        try:
            return self.log.read_text(errors="replace").count("New client connected")
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


MosquittoFactory = Callable[..., Mosquitto]


@pytest.fixture
def mosquitto(pki: TestPKI, tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Start Mosquitto over mTLS: ``start(revoked=[serial...], require_certificate=True,
    port=None)``; every broker started is killed at teardown."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not installed (make system-deps)")
    cert, key = pki.server("mosquitto")
    started: list[Mosquitto] = []

    def start(
        revoked: list[int] | None = None,
        *,
        require_certificate: bool = True,
        port: int | None = None,
    ) -> Mosquitto:
        port = port or free_port()
        lines = [
            f"listener {port} 127.0.0.1",
            f"cafile {pki.layout.chain}",
            f"certfile {cert}",
            f"keyfile {key}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if require_certificate else 'false'}",
            f"use_identity_as_username {'true' if require_certificate else 'false'}",
            "allow_anonymous false",
            "persistence false",
            "max_inflight_messages 0",
            "max_queued_messages 100000",
            f"log_dest file {tmp_path / f'mosquitto-{port}.log'}",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot read tmp_path
        if revoked:
            crl = pki.ca.build_crl([RevokedEntry(s, utcnow()) for s in revoked])
            crl_path = tmp_path / f"crl-{port}.pem"
            crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            lines.append(f"crlfile {crl_path}")
        config = tmp_path / f"mosquitto-{port}.conf"
        config.write_text("\n".join(lines) + "\n")
        process = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        broker = Mosquitto(port, process, config, tmp_path / f"mosquitto-{port}.log")
        started.append(broker)
        wait_listening(port, process)
        return broker

    yield start
    for broker in started:
        broker.stop()


def device_cert(data_dir: Path, device_id: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        (data_dir / "devices" / device_id / "device.crt").read_bytes()
    )


@pytest.fixture
def certfleet_broker(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerServer]:
    """Our own broker (mTLS, identity from the certificate, revocation) on 127.0.0.1:0."""
    with BrokerServer(certfleet_broker_settings(pki, tmp_path / "broker-data")) as server:
        yield server
