"""A batch killed in the middle and run again resumes without double or lost certificates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from factory.ca import CertificateAuthority
from factory.manifest import Manifest
from factory.provision import provision_batch
from fleetcore.layout import DataLayout
from fleetcore.profile import serial_hex
from tests.factory.conftest import CERTFLEET, run_certfleet

COUNT = 8000


def _manifest_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the minting workers die with their group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError("worker processes survived SIGKILL of their group")


def _assert_invariants(layout: DataLayout, count: int) -> None:
    records = list(Manifest(layout.manifest).records())
    ids = [r.device_id for r in records]
    assert len(ids) == len(set(ids)), "a device appears twice in the manifest"
    assert sorted(ids) == [f"dev-{i:06d}" for i in range(1, count + 1)]
    bundles = sorted(p.name for p in layout.devices_dir.iterdir())
    assert bundles == sorted(ids), "bundles and manifest disagree"
    for record in records:
        certificate = x509.load_pem_x509_certificate(
            (layout.device_dir(record.device_id) / "device.crt").read_bytes()
        )
        assert serial_hex(certificate.serial_number) == record.serial, record.device_id
        assert record.certificate_pem.encode() == certificate.public_bytes(Encoding.PEM)
    assert not layout.provision_tmp_dir.exists(), "a half-written bundle survived"


def test_batch_killed_mid_run_resumes_without_double_or_missing_certificates(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    args = [
        "factory", "provision", "--count", str(COUNT), "--data-dir", str(layout.root),
        "--workers", "2", "--chunk-size", "50",
    ]  # fmt: skip
    process = subprocess.Popen(
        [*CERTFLEET, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while _manifest_lines(layout.manifest) < 100:
            assert process.poll() is None, "provisioning ended before it could be killed"
            assert time.monotonic() < deadline, "provisioning made no progress"
            time.sleep(0.005)
    finally:
        _kill_group(process)
    assert process.returncode == -signal.SIGKILL
    lines_at_kill = _manifest_lines(layout.manifest)
    assert lines_at_kill < COUNT, "the batch finished before the kill; nothing was tested"

    rerun = run_certfleet([*args, "--json"])
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["skipped"] >= 100
    assert summary["skipped"] + summary["recovered"] + summary["issued"] == COUNT
    _assert_invariants(layout, COUNT)

    again = run_certfleet([*args, "--json"])
    assert json.loads(again.stdout)["issued"] == 0


def test_bundle_without_manifest_line_is_recorded_not_reissued(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    provision_batch(ca, 5, workers=1)
    lines = layout.manifest.read_bytes().splitlines(keepends=True)
    layout.manifest.write_bytes(b"".join(lines[:3]))  # lines of dev-000004/5 lost in a crash
    before = (layout.device_dir("dev-000005") / "device.crt").read_bytes()

    summary = provision_batch(ca, 5, workers=1)

    assert (summary.issued, summary.recovered, summary.skipped) == (0, 2, 3)
    assert (layout.device_dir("dev-000005") / "device.crt").read_bytes() == before
    _assert_invariants(layout, 5)


def test_truncated_last_manifest_line_is_dropped_and_rederived(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    provision_batch(ca, 4, workers=1)
    data = layout.manifest.read_bytes()
    layout.manifest.write_bytes(data[: len(data) - 200])  # crash in the middle of the last line

    summary = provision_batch(ca, 4, workers=1)

    assert summary.manifest_bytes_repaired > 0
    assert (summary.issued, summary.recovered, summary.skipped) == (0, 1, 3)
    _assert_invariants(layout, 4)


def test_half_written_bundle_is_removed_and_device_minted_once(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    provision_batch(ca, 2, workers=1)
    partial = layout.provision_tmp_dir / "dev-000003"
    partial.mkdir(parents=True)
    (partial / "device.key").write_bytes(b"half")

    summary = provision_batch(ca, 3, workers=1)

    assert summary.temp_bundles_removed == 1
    assert (summary.issued, summary.skipped) == (1, 2)
    _assert_invariants(layout, 3)
