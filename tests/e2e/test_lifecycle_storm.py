"""`certfleet sim lifecycle` for real, small: 40 devices whose certificates live 45 s, renewed
by themselves over MQTT through our broker and registry (child processes), once without and
once with a 60 s expiry stagger. About three minutes.

Why these sizes: without a stagger the 40 renewals fall within +-5 % of the lifetime (4.5 s),
so one 10 s bucket holds at least 20 of them (2/s); with 60 s of stagger they spread over
about 40 s (about 1/s). That margin holds at 40 devices; at 20 it would not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.lifecycle import RUN_KEYS

# Not `alone`: the renewals fall at 2/3 of a 45 s lifetime (+-5 %), some 13 s before expiry, and
# take milliseconds; the stagger comparison counts renewals in 10 s buckets. Run beside the
# registry and console tests under `-n 2` it took 169 s against 167 s alone, and passed.

DEVICES = 40
LIFETIME_S = 45
DURATION_S = 78
STAGGER_S = 60


@pytest.mark.slow
def test_a_compressed_fleet_life_renews_every_device_before_it_expires(tmp_path: Path) -> None:
    png = tmp_path / "storm.png"
    work = tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, "-m", "certfleet.cli", "sim", "lifecycle", "--json"]
    argv += ["--devices", str(DEVICES), "--lifetime", f"{LIFETIME_S}s"]
    argv += ["--stagger", f"0,{STAGGER_S}s", "--duration", f"{DURATION_S}s", "--workers", "1"]
    argv += ["--work-dir", str(work), "--png", str(png)]
    completed = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CERTFLEET_LOG_LEVEL": "warning"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    body = json.loads(completed.stdout)
    assert set(body) == {"runs", "png"}
    assert body["png"] == str(png)
    assert png.read_bytes().startswith(b"\x89PNG")
    runs = body["runs"]
    print(json.dumps(runs, indent=2))  # shown when an assertion fails
    assert [run["stagger_s"] for run in runs] == [0, STAGGER_S]
    for run in runs:
        assert list(run) == RUN_KEYS
        assert run["renewals"] >= DEVICES, run
        assert run["expired_before_renewal"] == 0, run
        assert run["superseded_revoked"] > 0, run
        assert 0 < run["renewal_latency_p50_ms"] <= run["renewal_latency_p99_ms"], run
        assert 0 < run["p99_renewals_per_s"] <= run["peak_renewals_per_s"], run
    unstaggered, staggered = runs
    assert staggered["peak_renewals_per_s"] < unstaggered["peak_renewals_per_s"], runs
    # Every run's data folder (and so every process's files) is gone afterwards.
    assert list(work.iterdir()) == []
