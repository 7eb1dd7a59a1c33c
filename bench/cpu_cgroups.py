"""One CPU cgroup per broker node: emulate one machine per node on this one (issue 24).

Each group gets the same quota (``--node-cpu 0.25``: a quarter of a CPU), cgroup v1
(``/sys/fs/cgroup/cpu/<name>/cpu.cfs_quota_us``) or v2 (``/sys/fs/cgroup/<name>/cpu.max``);
writing them needs root. :func:`available` says why not when they cannot be written, so the
benchmark skips visibly. Groups are removed at the end (their processes gone first).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def _root() -> tuple[Path, int] | None:
    if (V1 / "cpu.cfs_quota_us").exists():
        return V1, 1
    if (V2 / "cgroup.controllers").exists() and "cpu" in (V2 / "cgroup.controllers").read_text():
        return V2, 2
    return None


def available() -> str | None:
    """None when CPU cgroups can be made here; else why not (printed as the skip reason)."""
    found = _root()
    if found is None:
        return "no cgroup v1 cpu controller nor cgroup v2 with cpu"
    if os.geteuid() != 0 or not os.access(found[0], os.W_OK):
        return f"{found[0]} is not writable (run as root)"
    return None


class CpuGroup:
    """A cgroup limiting its processes to ``cpus`` CPUs."""

    def __init__(self, name: str, cpus: float) -> None:
        found = _root()
        if found is None:
            raise RuntimeError("no CPU cgroup controller")
        root, self.version = found
        self.path = root / name
        self.path.mkdir(exist_ok=True)
        quota = int(cpus * PERIOD_US)
        if self.version == 1:
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_fraction(self) -> float | None:
        """Of the scheduler periods in which the group ran, the fraction that used up its
        quota (cpu.stat ``nr_throttled / nr_periods``): near 1 for a node bound by its
        quota, lower for one the machine could not give its quota (or that waited on I/O)."""
        with contextlib.suppress(OSError, ValueError):
            stat = dict(
                line.split()[:2] for line in (self.path / "cpu.stat").read_text().splitlines()
            )
            periods = int(stat["nr_periods"])
            return round(int(stat["nr_throttled"]) / periods, 3) if periods else None
        return None

    def remove(self) -> None:
        """Delete the group (its processes have ended, or are moved back to the root)."""
        procs = self.path / "cgroup.procs"
        with contextlib.suppress(OSError):
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):
                    (self.path.parent / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()
