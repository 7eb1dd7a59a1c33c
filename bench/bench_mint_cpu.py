"""CPU per device of the factory's minting path in one process, without the pool.

Runs the minting worker's own code (``factory.provision._Minter``) in this process over N
devices into a fresh data folder under ``--scratch`` and prints devices/s and CPU
microseconds per device (user + system). On tmpfs that is the cryptography and Python cost;
on a disk the difference is the filesystem's. ``--profile`` adds the top of cProfile.

    python bench/bench_mint_cpu.py --scratch /dev/shm --count 10000
    python bench/bench_mint_cpu.py --scratch /dev/shm --count 10000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from factory.ca import CertificateAuthority
from factory.provision import _Minter, _WorkerConfig
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true")
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mint-cpu-", dir=options.scratch))
    try:
        layout = DataLayout(root)
        ca = CertificateAuthority.init(layout, "fleet.bench")
        config = _WorkerConfig(
            data_dir=str(root),
            trust_domain=ca.trust_domain,
            root_pem=ca.root_pem,
            issuing_pem=ca.issuing_cert.public_bytes(serialization.Encoding.PEM),
            issuing_key=ca.issuing_source,
            broker="127.0.0.1:8883",
            key_algorithm="p256",
            batch_start=utcnow(),
            lifetime=dt.timedelta(days=365),
            stagger=dt.timedelta(days=90),
            batch_id="bench",
        )
        layout.provision_tmp_dir.mkdir()
        layout.devices_dir.mkdir()
        minter = _Minter(config)
        chunk = [(i, f"dev-{i:06d}", None, False) for i in range(1, options.count + 1)]
        profiler = cProfile.Profile() if options.profile else None
        wall, cpu = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        minter.mint_chunk(chunk, want_records=False)
        if profiler is not None:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"{options.count} devices in {wall:.2f} s: {options.count / wall:,.0f}/s in one "
            f"process, {cpu / options.count * 1e6:.0f} us CPU per device"
            + (" (under cProfile)" if profiler is not None else "")
        )
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
