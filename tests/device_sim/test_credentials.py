"""The two-phase swap on disk (device_sim/credentials.py): after every step, as a crash would
leave it, the bundle's device.crt + device.key connect to a real broker (Mosquitto, mTLS)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim.bundle import DeviceBundle, tls_context
from device_sim.credentials import CredentialStore
from device_sim.transport import open_tls
from fleetcore.keys import private_key_pem
from fleetcore.profile import IdentityKind, serial_hex
from tests.device_sim.conftest import MosquittoFactory
from tests.support.pki import Fleet, TestPKI

pytestmark = pytest.mark.mosquitto


def _connects(directory: Path, port: int) -> str:
    """Connect with the bundle's files as any reader would; the serial presented."""
    bundle = DeviceBundle.load(directory)

    async def handshake() -> str:
        tls = await open_tls("127.0.0.1", port, tls_context(bundle))
        tls.close()
        return serial_hex(x509.load_pem_x509_certificate(bundle.cert.read_bytes()).serial_number)

    return asyncio.run(handshake())


def _new_pair(pki: TestPKI, device_id: str) -> tuple[bytes, bytes, str]:
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, device_id))
    assert issued.private_key is not None
    cert_pem = issued.certificate.public_bytes(serialization.Encoding.PEM)
    return (
        private_key_pem(issued.private_key),
        cert_pem,
        serial_hex(issued.certificate.serial_number),
    )


def _copy_bundle(fleet: Fleet, device_id: str, tmp_path: Path) -> Path:
    directory = tmp_path / "devices" / device_id
    shutil.copytree(fleet.data_dir / "devices" / device_id, directory)
    return directory


def test_every_step_of_the_swap_leaves_a_bundle_that_connects(
    pki: TestPKI, fleet: Fleet, mosquitto: MosquittoFactory, tmp_path: Path
) -> None:
    broker = mosquitto()
    directory = _copy_bundle(fleet, "dev-0050", tmp_path)
    store = CredentialStore(directory)
    old = serial_hex(fleet.serials["dev-0050"])
    assert _connects(directory, broker.port) == old  # a plain factory bundle

    store.adopt()  # plain files -> generations/<old>, links
    assert (directory / "device.crt").is_symlink() and (directory / "device.key").is_symlink()
    assert _connects(directory, broker.port) == old
    assert (directory / "current" / "device.key").stat().st_mode & 0o777 == 0o600

    key_pem, cert_pem, new = _new_pair(pki, "dev-0050")
    staged = store.stage(key_pem, cert_pem)  # phase 1: written as pending, not used
    assert _connects(directory, broker.port) == old
    pending_bundle = DeviceBundle.load(directory)

    async def with_pending() -> None:
        tls = await open_tls(
            "127.0.0.1", broker.port, tls_context(pending_bundle, staged.cert, staged.key)
        )
        tls.close()

    asyncio.run(with_pending())  # phase 2: the device proves the new pair connects

    store.promote()  # one rename: pending -> current
    assert _connects(directory, broker.port) == new
    previous = store.previous()
    assert previous is not None
    assert serial_hex(previous.certificate().serial_number) == old  # the old pair kept
    assert not (directory / "pending").exists()


def test_a_crash_in_the_middle_of_adopting_leaves_the_old_pair(
    fleet: Fleet, mosquitto: MosquittoFactory, tmp_path: Path
) -> None:
    broker = mosquitto()
    directory = _copy_bundle(fleet, "dev-0051", tmp_path)
    old = serial_hex(fleet.serials["dev-0051"])
    store = CredentialStore(directory)
    store.adopt()
    # As if the crash came after the key became a link but before the certificate did.
    cert = (directory / "device.crt").read_bytes()
    (directory / "device.crt").unlink()
    (directory / "device.crt").write_bytes(cert)
    assert _connects(directory, broker.port) == old
    store.adopt()  # idempotent: current exists
    assert _connects(directory, broker.port) == old


def test_a_pair_that_did_not_connect_is_discarded_and_the_old_one_stays(
    pki: TestPKI, fleet: Fleet, mosquitto: MosquittoFactory, tmp_path: Path
) -> None:
    broker = mosquitto()
    directory = _copy_bundle(fleet, "dev-0052", tmp_path)
    old = serial_hex(fleet.serials["dev-0052"])
    store = CredentialStore(directory)
    key_pem, cert_pem, new = _new_pair(pki, "dev-0052")
    store.stage(key_pem, cert_pem)
    store.discard()
    assert store.pending() is None
    assert not (directory / "generations" / new).exists()
    assert _connects(directory, broker.port) == old
    assert os.readlink(directory / "current") == f"generations/{old}"
