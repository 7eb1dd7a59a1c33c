"""The filesystem's own ceiling for device bundles: no cryptography, only the files.

Creates N bundle folders the way the factory lays them out (a temporary folder with five
small files, renamed into place) and prints bundles/s. Run it on the same scratch folder as
bench_factory.py to see how much of the factory's rate the disk allows.

    python bench/bench_fs_ceiling.py --scratch DIR --count 30000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

BUNDLE_FILES = ("device.crt", "device.key", "chain.pem", "root.crt", "device.json")
FILE_BYTES = b"x" * 700  # about the size of each bundle file


def write_bundles(root: Path, count: int) -> float:
    """Write ``count`` bundles under ``root``; return bundles per second."""
    started = time.perf_counter()
    for index in range(count):
        staging = root / f".tmp-dev-{index:06d}"
        staging.mkdir()
        for name in BUNDLE_FILES:
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, FILE_BYTES)
            os.close(fd)
        staging.rename(root / f"dev-{index:06d}")
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--count", type=int, default=30_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fs-ceiling-", dir=args.scratch))
    try:
        rate = write_bundles(root, args.count)
        print(f"filesystem ceiling at {args.scratch}: {args.count} bundles, {rate:,.0f} bundles/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
