"""Factory benchmark: devices/s end to end and peak memory, against one openssl chain per device.

What is measured (each in a fresh data folder on the same filesystem):
- ``certfleet factory provision --count N`` as a subprocess, for N = 10,000 and 100,000:
  wall time from start to exit (keys, certificates, five-file bundles renamed into place,
  fsync'd manifest) and the peak RSS summed over the process tree (parent + minting workers,
  sampled from /proc every 50 ms), to show memory does not grow with the batch;
- the usual shell approach for the same profile: per device one chain of ``openssl`` processes
  (``rand`` for the serial, ``genpkey``, ``req``, ``x509 -req`` with the device extensions) plus
  copying chain/root and writing device.json and a manifest line, for ``--openssl-count``
  devices, sequentially as such scripts run.

- first, the filesystem's own ceiling for the same bundle layout (``bench_fs_ceiling.py``:
  the factory's bundle writer with no cryptography) in the same scratch folder, as a check
  that the disk is in its normal state (see below).

Run it alone (two shared cores):

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_factory.py

On ext4 without a journal (this machine's disk) new inodes are slow to allocate next to
inodes freed in the last few minutes (the kernel's ``recently_deleted`` check scans past
them on every allocation). The scratch tree is deleted only at the end, so leave ten minutes
between runs, and do not delete other large trees on the same disk just before one; the
ceiling measured first shows whether the disk is in that slow state.

Writes a Markdown summary to stdout (and ``--out`` if given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cryptography
from cryptography.hazmat.backends.openssl import backend

CERTFLEET = [sys.executable, "-m", "certfleet.cli"]
TRUST_DOMAIN = "fleet.bench"
#: Below this filesystem ceiling the disk is in a slow phase (measured 9,000-14,000 normally).
SLOW_DISK_BUNDLES_PER_S = 6_000


@dataclass
class Run:
    devices: int
    seconds: float
    peak_rss_mb: float

    @property
    def rate(self) -> float:
        return self.devices / self.seconds


def _tree_rss_kb(root_pid: int) -> int:
    """Sum of VmRSS over root_pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                status = handle.read()
        except OSError:
            continue
        pid = int(entry)
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ppid = int(fields.get("PPid", "0").strip() or 0)
        children.setdefault(ppid, []).append(pid)
        value = fields.get("VmRSS", "0 kB").strip().split()[0]
        rss[pid] = int(value)
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def certfleet(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CERTFLEET_DATA_DIR": str(data_dir), "CERTFLEET_LOG_LEVEL": "warning"}
    return subprocess.run([*CERTFLEET, *args], env=env, capture_output=True, text=True, check=True)


def run_provision(count: int, data_dir: Path, workers: int) -> Run:
    certfleet(["ca", "init", "--trust-domain", TRUST_DOMAIN], data_dir)
    subprocess.run(["sync"], check=False)
    env = {**os.environ, "CERTFLEET_DATA_DIR": str(data_dir), "CERTFLEET_LOG_LEVEL": "warning"}
    args = ["factory", "provision", "--count", str(count), "--json", "--workers", str(workers)]
    peak = 0
    started = time.perf_counter()
    process = subprocess.Popen([*CERTFLEET, *args], env=env, stdout=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kb(process.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output, _ = process.communicate()
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"provision failed with exit code {process.returncode}")
    summary = json.loads(output)
    assert summary["issued"] == count, summary
    manifest_lines = sum(1 for _ in (data_dir / "manifest.jsonl").open("rb"))
    assert manifest_lines == count, manifest_lines
    return Run(count, elapsed, peak / 1024)


OPENSSL_DEVICE = r"""
id="$1"; dir="$DEVICES/$id"; mkdir -p "$dir"
serial=$(openssl rand -hex 16)
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/device.key" 2>/dev/null
chmod 600 "$dir/device.key"
openssl req -new -key "$dir/device.key" -subj "/CN=$id" -out "$dir/device.csr"
printf '%s\n' "[ext]" "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth" \
  "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" \
  "subjectAltName=URI:spiffe://$TD/device/$id" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/device.csr" -CA "$CA/issuing.crt" -CAkey "$CA/issuing.key" \
  -set_serial "0x$serial" -days 365 -extfile "$dir/ext.cnf" -extensions ext \
  -out "$dir/device.crt" 2>/dev/null
rm -f "$dir/device.csr" "$dir/ext.cnf"
cp "$CA/chain.pem" "$dir/chain.pem"; cp "$CA/root.crt" "$dir/root.crt"
printf '{"device_id":"%s","serial":"%s","broker":"127.0.0.1:8883"}\n' "$id" "$serial" \
  > "$dir/device.json"
printf '{"device_id":"%s","serial":"%s"}\n' "$id" "$serial" >> "$MANIFEST"
"""


def run_openssl(count: int, data_dir: Path) -> Run:
    certfleet(["ca", "init", "--trust-domain", TRUST_DOMAIN], data_dir)
    script = data_dir / "device.sh"
    script.write_text(OPENSSL_DEVICE)
    env = {
        **os.environ,
        "DEVICES": str(data_dir / "devices"),
        "CA": str(data_dir / "ca"),
        "TD": TRUST_DOMAIN,
        "MANIFEST": str(data_dir / "manifest.jsonl"),
    }
    started = time.perf_counter()
    for index in range(1, count + 1):
        subprocess.run(["bash", str(script), f"dev-{index:06d}"], env=env, check=True)
    elapsed = time.perf_counter() - started
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(data_dir / "ca" / "root.crt"),
         "-untrusted", str(data_dir / "ca" / "chain.pem"),
         str(data_dir / "devices" / "dev-000001" / "device.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    return Run(count, elapsed, 0.0)


def fs_ceiling(count: int, scratch: Path) -> float:
    """bench_fs_ceiling.py in the same scratch folder; its bundles/s."""
    script = Path(__file__).with_name("bench_fs_ceiling.py")
    result = subprocess.run(
        [sys.executable, str(script), "--scratch", str(scratch), "--count", str(count), "--keep"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # "filesystem ceiling at DIR: N bundles, W writers, R bundles/s"; the tree stays until
    # the whole scratch is deleted, so it frees no inodes before the factory runs.
    match = re.search(r"([\d,]+) bundles/s", result.stdout)
    if match is None:
        raise SystemExit(f"bench_fs_ceiling.py printed no rate: {result.stdout!r}")
    return float(match.group(1).replace(",", ""))


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10000,100000", help="batch sizes, comma separated")
    parser.add_argument("--openssl-count", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per CPU")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="where the data folders go (default: a tmp dir). Deleting 100k-bundle trees "
        "leaves ext4 block groups slow to allocate from for a while, so give a fresh folder "
        "and leave time between runs; folders are deleted only at the end.",
    )
    parser.add_argument(
        "--ceiling-count", type=int, default=30_000, help="bundles for the filesystem ceiling"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    options = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="certfleet-bench-", dir=options.scratch))
    runs: list[Run] = []
    try:
        ceiling = fs_ceiling(options.ceiling_count, scratch) if options.ceiling_count else None
        if ceiling is not None:
            print(f"filesystem ceiling: {ceiling:,.0f} bundles/s", file=sys.stderr)
            if ceiling < SLOW_DISK_BUNDLES_PER_S:
                print(
                    f"warning: the disk writes only {ceiling:,.0f} bundles/s; on ext4 without a "
                    "journal that follows a large deletion: wait ten minutes and run again",
                    file=sys.stderr,
                )
        for count in (int(c) for c in options.counts.split(",")):
            data_dir = scratch / f"provision-{count}"
            runs.append(run_provision(count, data_dir, options.workers))
            print(
                f"provision {count}: {runs[-1].seconds:.1f}s {runs[-1].rate:.0f}/s "
                f"peak {runs[-1].peak_rss_mb:.0f} MB",
                file=sys.stderr,
            )
            subprocess.run(["sync"], check=False)
        shell = run_openssl(options.openssl_count, scratch / "openssl")
        print(f"openssl {shell.devices}: {shell.rate:.1f}/s", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    biggest = max(runs, key=lambda r: r.devices)
    lines = [
        "## Factory: provisioning throughput",
        "",
        f"Machine: {os.cpu_count()} cores, {cpu_model()}; Python {platform.python_version()}; "
        f"cryptography {cryptography.__version__} ({backend.openssl_version_text()}); "
        f"openssl command for the shell loop: "
        f"{subprocess.run(['openssl', 'version'], capture_output=True, text=True).stdout.strip()}.",
        "",
        "| run | devices | seconds | devices/s | peak RSS, whole process tree |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| certfleet factory provision | {run.devices:,} | {run.seconds:.1f} | "
            f"{run.rate:,.0f} | {run.peak_rss_mb:.0f} MB |"
        )
    lines.append(
        f"| one openssl process chain per device | {shell.devices:,} | {shell.seconds:.1f} | "
        f"{shell.rate:,.1f} | - |"
    )
    if ceiling is not None:
        lines.append(
            f"| filesystem ceiling (bundle files only, no cryptography) | "
            f"{options.ceiling_count:,} | - | {ceiling:,.0f} | - |"
        )
    lines += [
        "",
        f"Ratio at {biggest.devices:,} devices: **{biggest.rate / shell.rate:,.0f}x** the "
        "openssl shell loop.",
        "",
        "Command: `flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_factory.py "
        + " ".join(sys.argv[1:])
        + "`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if options.out is not None:
        options.out.write_text(text)


if __name__ == "__main__":
    main()
