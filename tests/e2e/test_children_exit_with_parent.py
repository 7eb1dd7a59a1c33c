"""A SIGKILLed orchestrator leaves no orphans: the services and the nats-server it started
are stopped by the kernel's parent-death signal (fleetcore/children.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.cluster.natsd import INSTALL_HINT, find_nats_server

# `alone`: children gone within 10 s of their parent's SIGKILL (time bounds).
pytestmark = pytest.mark.alone

_ORCHESTRATOR = """
import json, sys, time
from pathlib import Path
from broker.cluster.natsd import LocalNats
from certfleet.procs import ProcessGroup

folder = Path(sys.argv[1])
nats = LocalNats(folder / "nats").start()
group = ProcessGroup(folder / "logs")
ready = folder / "service.ready"
service = group.start(
    "service",
    [sys.executable, "-c",
     f"import pathlib, time; pathlib.Path({str(ready)!r}).write_text('{{}}'); time.sleep(120)"],
    ready,
)
print(json.dumps({"nats": nats.process.pid, "service": service.pid}), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return stat[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_services_and_nats_stop_when_their_orchestrator_is_sigkilled(tmp_path: Path) -> None:
    if find_nats_server() is None:
        pytest.skip(f"nats-server not installed ({INSTALL_HINT})")
    orchestrator = subprocess.Popen(
        [sys.executable, "-c", _ORCHESTRATOR, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    children: dict[str, int] = {}
    try:
        assert orchestrator.stdout is not None
        children = json.loads(orchestrator.stdout.readline())
        assert all(_alive(pid) for pid in children.values())
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in children.values()):
            time.sleep(0.1)
        left = {name: pid for name, pid in children.items() if _alive(pid)}
        assert not left, f"still running after their parent was SIGKILLed: {left}"
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        for pid in children.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
