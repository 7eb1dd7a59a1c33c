"""The filesystem's own ceiling for device bundles: no cryptography, only the files.

Writes N bundles with the factory's own writer (``factory.bundle.write_bundle``: a
temporary folder with device.key, device.crt and device.json, chain.pem and root.crt
hard-linked from one shared pair, renamed into ``devices/``) from one process per CPU, as
the factory's workers do, and prints bundles/s. Run it on the same scratch folder as
bench_factory.py to see how much of the factory's rate the disk allows.

    python bench/bench_fs_ceiling.py --scratch DIR --count 30000

The tree is deleted at the end. On ext4 without a journal (this machine's disk), inodes
freed in the last minutes make new inodes near them slow to allocate (the kernel's
``recently_deleted`` check), so leave a few minutes before the next run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from factory.bundle import SharedCAFiles, write_bundle

FILE_BYTES = b"x" * 700  # about the size of each bundle file


def write_bundles(root: str, worker: int, workers: int, count: int) -> None:
    """Write this worker's share of ``count`` bundles under ``root``."""
    temp = f"{root}/.provision-tmp"
    ca_files = SharedCAFiles(temp, chain_pem=FILE_BYTES, root_pem=FILE_BYTES)
    for index in range(worker, count, workers):
        name = f"dev-{index:06d}"
        write_bundle(
            f"{temp}/{name}",
            f"{root}/devices/{name}",
            certificate_pem=FILE_BYTES,
            key_pem=FILE_BYTES,
            ca_files=ca_files,
            info_json=FILE_BYTES,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--count", type=int, default=30_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--keep", action="store_true", help="leave the tree (the caller deletes the scratch)"
    )
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="fs-ceiling-", dir=args.scratch)
    os.mkdir(f"{root}/.provision-tmp")
    os.mkdir(f"{root}/devices")
    try:
        with ProcessPoolExecutor(args.workers) as pool:
            started = time.perf_counter()
            jobs = [
                pool.submit(write_bundles, root, worker, args.workers, args.count)
                for worker in range(args.workers)
            ]
            for job in jobs:
                job.result()
            rate = args.count / (time.perf_counter() - started)
        print(
            f"filesystem ceiling at {args.scratch}: {args.count} bundles, {args.workers} "
            f"writers, {rate:,.0f} bundles/s"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
