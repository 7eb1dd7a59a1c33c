"""`certfleet factory export`: PKCS#12 that openssl reads, DER, and the refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from factory.ca import CertificateAuthority
from factory.errors import ExportError
from fleetcore.errors import ConfigError
from fleetcore.layout import DataLayout
from tests.factory.conftest import run_factory

OPENSSL = shutil.which("openssl")
PASSWORD = "correct horse battery"


@pytest.fixture
def provisioned(ca: CertificateAuthority, layout: DataLayout) -> str:
    result = run_factory(["provision", "--count", "1", "--data-dir", str(layout.root)])
    assert result.exit_code == 0, result.output
    return "dev-000001"


def password_file(tmp_path: Path, text: str = PASSWORD + "\n", mode: int = 0o600) -> Path:
    path = tmp_path / "p12.pass"
    path.write_text(text)
    path.chmod(mode)
    return path


def export(layout: DataLayout, *args: str) -> Result:
    return run_factory(["export", "--data-dir", str(layout.root), *args])


def test_p12_holds_key_certificate_and_chain_and_openssl_reads_it(
    layout: DataLayout, provisioned: str, tmp_path: Path
) -> None:
    out = tmp_path / "dev.p12"
    result = run_factory(
        [
            "export",
            "--device",
            provisioned,
            "--p12",
            str(out),
            "--password-file",
            str(password_file(tmp_path)),
            "--data-dir",
            str(layout.root),
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"device_id": provisioned, "p12": str(out)}
    assert out.stat().st_mode & 0o777 == 0o600
    key, certificate, chain = pkcs12.load_key_and_certificates(out.read_bytes(), PASSWORD.encode())
    bundle = layout.device_dir(provisioned)
    assert certificate == x509.load_pem_x509_certificate((bundle / "device.crt").read_bytes())
    assert key is not None and key.public_key() == certificate.public_key()
    assert chain == x509.load_pem_x509_certificates((bundle / "chain.pem").read_bytes())

    if OPENSSL is None:
        pytest.skip("openssl not installed (apt-get install openssl): PKCS#12 read by us only")
    info = subprocess.run(
        [OPENSSL, "pkcs12", "-info", "-in", str(out), "-passin", f"pass:{PASSWORD}", "-nokeys"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert info.returncode == 0, info.stderr
    assert f"subject=CN = {provisioned}" in info.stdout
    assert info.stdout.count("BEGIN CERTIFICATE") == 3  # leaf, issuing, root
    wrong = subprocess.run(
        [OPENSSL, "pkcs12", "-info", "-in", str(out), "-passin", "pass:wrong-password"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode != 0


def test_der_is_the_bundle_certificate(
    layout: DataLayout, provisioned: str, tmp_path: Path
) -> None:
    out = tmp_path / "dev.der"
    result = export(layout, "--device", provisioned, "--der", str(out))
    assert result.exit_code == 0, result.output
    certificate = x509.load_der_x509_certificate(out.read_bytes())
    pem = (layout.device_dir(provisioned) / "device.crt").read_bytes()
    assert certificate == x509.load_pem_x509_certificate(pem)
    if OPENSSL is not None:
        text = subprocess.run(
            [OPENSSL, "x509", "-inform", "DER", "-in", str(out), "-noout", "-subject"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert f"CN = {provisioned}" in text.stdout


@pytest.mark.parametrize(
    ("text", "mode", "error", "match"),
    [
        ("short\n", 0o600, ExportError, "shorter than 8"),
        ("\n", 0o600, ConfigError, "is empty"),
        (PASSWORD, 0o644, ConfigError, "readable by other users"),
    ],
)
def test_bad_password_files_are_refused_and_nothing_is_written(
    layout: DataLayout,
    provisioned: str,
    tmp_path: Path,
    text: str,
    mode: int,
    error: type[Exception],
    match: str,
) -> None:
    out = tmp_path / "dev.p12"
    result = export(
        layout,
        "--device",
        provisioned,
        "--p12",
        str(out),
        "--password-file",
        str(password_file(tmp_path, text, mode)),
    )
    assert isinstance(result.exception, error)
    assert match in str(result.exception)
    assert not out.exists()


def test_refusals_of_export(layout: DataLayout, provisioned: str, tmp_path: Path) -> None:
    out = tmp_path / "x.der"
    cases = [
        (["--device", provisioned], ConfigError, "--p12 FILE"),
        (
            ["--device", provisioned, "--p12", str(tmp_path / "a.p12")],
            ConfigError,
            "needs --password-file",
        ),
        (["--device", "dev-nope", "--der", str(out)], ExportError, "no complete bundle"),
        (
            ["--device", provisioned, "--der", str(tmp_path / "missing" / "x.der")],
            ExportError,
            "does not exist",
        ),
        (
            [
                "--device",
                provisioned,
                "--p12",
                str(tmp_path / "a.p12"),
                "--password-file",
                str(tmp_path / "none"),
            ],
            ConfigError,
            "does not exist",
        ),
    ]
    for args, error, match in cases:
        result = export(layout, *args)
        assert isinstance(result.exception, error), (args, result.output)
        assert match in str(result.exception), args
    assert export(layout, "--device", provisioned, "--der", str(out)).exit_code == 0
    again = export(layout, "--device", provisioned, "--der", str(out))
    assert isinstance(again.exception, ExportError)
    assert "--force" in str(again.exception)
    assert export(layout, "--device", provisioned, "--der", str(out), "--force").exit_code == 0
