"""A provisioned device: its certificate field by field against DESIGN.md, its bundle, and its
chain in openssl and in a real mutual-TLS handshake."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory.ca import CertificateAuthority, write_issued
from factory.errors import ProvisionError
from factory.manifest import MANIFEST_FIELDS, Manifest
from factory.provision import provision_batch
from fleetcore.layout import DataLayout
from fleetcore.profile import CLOCK_SKEW, serial_hex
from tests.factory.conftest import TRUST_DOMAIN, run_factory
from tests.support.processes import certfleet_in_process


@pytest.fixture
def batch(ca: CertificateAuthority, layout: DataLayout) -> DataLayout:
    provision_batch(ca, 3, broker="127.0.0.1:18883", workers=1)
    return layout


def _device_cert(layout: DataLayout, device_id: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        (layout.device_dir(device_id) / "device.crt").read_bytes()
    )


def test_device_certificate_matches_the_profile_field_by_field(
    ca: CertificateAuthority, batch: DataLayout
) -> None:
    before = dt.datetime.now(dt.UTC)
    cert = _device_cert(batch, "dev-000002")
    ext = cert.extensions

    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    issuing_ski = ca.issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == issuing_ski.value.digest

    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [
        x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/dev-000002")
    ]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        "dev-000002"
    ]
    assert cert.issuer == ca.issuing_cert.subject
    assert cert.serial_number.bit_length() >= 128
    assert len({_device_cert(batch, f"dev-00000{i}").serial_number for i in (1, 2, 3)}) == 3
    skew = before - cert.not_valid_before_utc
    assert CLOCK_SKEW - dt.timedelta(minutes=1) <= skew <= CLOCK_SKEW + dt.timedelta(minutes=1)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=365 + 90) + CLOCK_SKEW
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"


def test_bundle_has_key_0600_chain_root_and_device_json(
    ca: CertificateAuthority, batch: DataLayout
) -> None:
    bundle = batch.device_dir("dev-000001")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "chain.pem", "device.crt", "device.json", "device.key", "root.crt",
    ]  # fmt: skip
    assert stat.S_IMODE((bundle / "device.key").stat().st_mode) == 0o600
    assert (bundle / "root.crt").read_bytes() == ca.root_pem
    assert (bundle / "chain.pem").read_bytes() == ca.chain_pem
    info = json.loads((bundle / "device.json").read_text())
    cert = _device_cert(batch, "dev-000001")
    assert info == {
        "device_id": "dev-000001",
        "hardware_serial": None,
        "serial": serial_hex(cert.serial_number),
        "identity": f"spiffe://{TRUST_DOMAIN}/device/dev-000001",
        "trust_domain": TRUST_DOMAIN,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "broker": "127.0.0.1:18883",
    }


def test_manifest_has_one_line_per_certificate_in_the_shared_format(batch: DataLayout) -> None:
    lines = batch.manifest.read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert set(first) == set(MANIFEST_FIELDS)
    cert = _device_cert(batch, "dev-000001")
    assert first["serial"] == serial_hex(cert.serial_number)
    assert first["certificate_pem"] == (batch.device_dir("dev-000001") / "device.crt").read_text()
    assert len({json.loads(line)["batch_id"] for line in lines}) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_chain_verifies_with_openssl(batch: DataLayout) -> None:
    bundle = batch.device_dir("dev-000003")
    result = subprocess.run(
        [
            "openssl", "verify", "-purpose", "sslclient",
            "-CAfile", str(bundle / "root.crt"),
            "-untrusted", str(bundle / "chain.pem"),
            str(bundle / "device.crt"),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")


def _serve_once(context: ssl.SSLContext, listener: socket.socket, seen: dict[str, object]) -> None:
    connection, _ = listener.accept()
    try:
        with context.wrap_socket(connection, server_side=True) as tls:
            seen["peer"] = tls.getpeercert()
            tls.sendall(b"ok")
    except (ssl.SSLError, OSError) as exc:
        seen["error"] = exc


def test_device_bundle_completes_a_real_mutual_tls_handshake(
    ca: CertificateAuthority, batch: DataLayout
) -> None:
    server = ca.issue_server("tls-probe", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    write_issued(
        server,
        batch.server_cert("tls-probe"),
        batch.server_key("tls-probe"),
        intermediate=ca.issuing_cert,
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(str(batch.chain))
    server_context.load_cert_chain(
        str(batch.server_cert("tls-probe")), str(batch.server_key("tls-probe"))
    )
    bundle = batch.device_dir("dev-000001")
    client_context = ssl.create_default_context(cafile=str(bundle / "root.crt"))
    client_context.load_cert_chain(str(bundle / "device.crt"), str(bundle / "device.key"))

    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=_serve_once, args=(server_context, listener, seen))
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(timeout=10)
    assert "error" not in seen, seen.get("error")
    peer = seen["peer"]
    assert isinstance(peer, dict)
    assert peer["subjectAltName"] == (("URI", f"spiffe://{TRUST_DOMAIN}/device/dev-000001"),)


def test_serials_csv_gives_ids_from_hardware_serials(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path
) -> None:
    csv_file = tmp_path / "line.csv"
    csv_file.write_text("hardware_serial,model\nHW-0001,x1\nHW-0002,x1\n")
    result = run_factory(
        ["provision", "--serials", str(csv_file), "--data-dir", str(layout.root), "--json"]
    )
    assert result.exit_code == 0, result.output
    records = list(Manifest(layout.manifest).records())
    assert [(r.device_id, r.hardware_serial) for r in records] == [
        ("dev-HW-0001", "HW-0001"),
        ("dev-HW-0002", "HW-0002"),
    ]
    info = json.loads((layout.device_dir("dev-HW-0002") / "device.json").read_text())
    assert info["hardware_serial"] == "HW-0002"


def test_hardware_serial_already_issued_to_another_device_is_refused(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path
) -> None:
    first = tmp_path / "first.csv"
    first.write_text("hardware_serial,device_id\nHW-1,meter-1\n")
    assert run_factory(["provision", "--serials", str(first), "--data-dir", str(layout.root)])
    second = tmp_path / "second.csv"
    second.write_text("hardware_serial,device_id\nHW-1,meter-2\n")
    result = run_factory(["provision", "--serials", str(second), "--data-dir", str(layout.root)])
    assert isinstance(result.exception, ProvisionError)
    with pytest.raises(ProvisionError, match="HW-1.*already issued to device 'meter-1'"):
        raise result.exception
    assert [r.device_id for r in Manifest(layout.manifest).records()] == ["meter-1"]
    assert not layout.device_dir("meter-2").exists()


def test_large_batch_uses_the_process_pool_and_keeps_batch_order(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    ticks: list[tuple[int, int]] = []
    summary = provision_batch(
        ca, 900, workers=2, chunk_size=100, on_progress=lambda d, t: ticks.append((d, t))
    )
    assert summary.issued == 900
    ids = [r.device_id for r in Manifest(layout.manifest).records()]
    assert ids == [f"dev-{i:06d}" for i in range(1, 901)]
    assert ticks[0] == (0, 900)
    assert ticks[-1] == (900, 900)
    assert summary.device_ids == ids


def test_cli_error_is_one_line_and_exit_code_2(layout: DataLayout) -> None:
    result = certfleet_in_process(
        "factory", "provision", "--count", "0", "--data-dir", str(layout.root)
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "certfleet: error: --count must be at least 1 (got 0)"
