"""Where our broker's per-connection memory goes: tracemalloc by file, plus RSS.

    flock /tmp/certfleet-bench.lock python bench/bench_broker_memory.py --devices 1000

Runs our broker in this process with tracemalloc on, holds N idle device connections from
one client process (bench_broker_conn.py's worker), and prints the Python-heap growth per
connection grouped by source file, next to the RSS growth (which also counts OpenSSL's
per-connection state, invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import broker_bench_lib as lib  # noqa: E402

from broker.server import BrokerServer  # noqa: E402
from broker.settings import BrokerSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()
    lib.raise_nofile()
    root = lib.tmp_root("certfleet-bench-mem-")
    lib.make_fleet(root, args.devices)
    settings = BrokerSettings(data_dir=root, broker_addr="127.0.0.1:0", broker_metrics_addr=None)
    tracemalloc.start(1)
    with BrokerServer(settings) as broker:
        time.sleep(1.0)
        before = tracemalloc.take_snapshot()
        rss_before = lib.rss_kib(os.getpid())
        worker = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("bench_broker_conn.py")),
                "--worker",
                "--data-dir",
                str(root),
                "--port",
                str(broker.port),
                "--start",
                "0",
                "--end",
                str(args.devices),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lib.raise_nofile,
        )
        report = json.loads(worker.stdout.readline())  # type: ignore[union-attr]
        time.sleep(2.0)
        after = tracemalloc.take_snapshot()
        rss_after = lib.rss_kib(os.getpid())
        connected = int(report["ok"])
        stats = after.compare_to(before, "filename")
        total = sum(s.size_diff for s in stats)
        print(f"# {connected} connections held")
        print(
            f"RSS growth per connection: {(rss_after - rss_before) / connected:.1f} KiB "
            "(includes tracemalloc's own bookkeeping)"
        )
        print(f"Python heap growth per connection: {total / connected / 1024:.1f} KiB")
        for stat in stats[:15]:
            name = stat.traceback[0].filename.split("site-packages/")[-1]
            print(f"  {stat.size_diff / connected / 1024:7.2f} KiB  {name}")
        worker.stdin.close()  # type: ignore[union-attr]
        worker.wait(timeout=120)


if __name__ == "__main__":
    main()
