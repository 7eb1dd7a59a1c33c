"""`certfleet sim lifecycle` without processes: its flags, its JSON object, table and chart."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from certfleet.lifecycle_cli import parse_seconds, parse_staggers
from certfleet.lifecycle_report import lifecycle_json, render_table, write_png
from certfleet.lifecycle_run import LifecyclePlan, StaggerRun, registry_env
from certfleet.lifecycle_stats import Renewal, figures
from fleetcore.errors import ConfigError
from tests.support.lifecycle import RUN_KEYS


def _run(stagger_s: int, times: list[float]) -> StaggerRun:
    renewals = [Renewal(f"dev-{i}", t, 0.05, refused=i % 2) for i, t in enumerate(times)]
    return StaggerRun(
        stagger_s=stagger_s,
        figures=figures(renewals, 60.0),
        expired_before_renewal=0,
        superseded_revoked=len(times),
        renewal_times_s=times,
        certificates_issued=2 * len(times),
    )


PLAN = LifecyclePlan(devices=4, lifetime_s=60, staggers_s=(0, 20), duration_s=60.0)


def test_durations_are_seconds_or_units() -> None:
    assert parse_seconds("240", what="--lifetime") == 240
    assert parse_seconds("4m", what="--lifetime") == 240
    assert parse_seconds("0", what="--stagger", allow_zero=True) == 0
    assert parse_staggers("0,2m") == (0, 120)
    assert parse_staggers(" 30s , 0 ") == (30, 0)


def test_bad_durations_are_refused_with_the_flag_named() -> None:
    with pytest.raises(ConfigError, match="--lifetime '4 minutes' is not a duration"):
        parse_seconds("4 minutes", what="--lifetime")
    with pytest.raises(ConfigError, match="--lifetime must be longer than zero"):
        parse_seconds("0", what="--lifetime")
    with pytest.raises(ConfigError, match="names a value twice"):
        parse_staggers("0,0s")
    with pytest.raises(ConfigError, match="at least one value"):
        parse_staggers(" , ")


def test_grace_is_five_percent_of_the_lifetime_by_default() -> None:
    assert LifecyclePlan(devices=1, lifetime_s=240, staggers_s=(0,), duration_s=1).grace == 12
    explicit = LifecyclePlan(devices=1, lifetime_s=240, staggers_s=(0,), duration_s=1, grace_s=3)
    assert explicit.grace == 3


def test_the_registry_of_a_run_gets_the_grace_and_a_limit_below_the_lifetime() -> None:
    env = registry_env(PLAN)
    assert env["CERTFLEET_REGISTRY_SUPERSEDE_GRACE_S"] == "3"
    assert "CERTFLEET_REGISTRY_RENEWAL_STAGGER_S" not in env  # the copied length keeps it
    assert float(env["CERTFLEET_REGISTRY_RENEWAL_MIN_INTERVAL_S"]) < 2 / 3 * PLAN.lifetime_s


def test_json_object_has_the_issue_schema(tmp_path: Path) -> None:
    runs = [_run(0, [1.0, 2.0, 3.0, 4.0]), _run(20, [1.0, 12.0, 25.0, 38.0])]
    body = lifecycle_json(runs, tmp_path / "chart.png")
    assert list(body) == ["runs", "png"]
    assert [list(run) for run in body["runs"]] == [RUN_KEYS, RUN_KEYS]
    assert body["runs"][0]["peak_renewals_per_s"] == 0.4
    assert body["runs"][1]["peak_renewals_per_s"] == 0.1
    assert body["runs"][0]["refused"] == 2
    assert body["png"] == str(tmp_path / "chart.png")
    assert lifecycle_json(runs, None)["png"] is None


def test_table_and_chart(tmp_path: Path) -> None:
    runs = [_run(0, [1.0, 2.0, 3.0, 4.0]), _run(20, [1.0, 12.0, 25.0, 38.0])]
    output = io.StringIO()
    render_table(PLAN, runs, Console(file=output, width=200))
    text = output.getvalue()
    assert "renewal storm: 4 devices" in text
    assert "peak with stagger 20 s is 25% of the peak with stagger 0 s" in text
    png = write_png(PLAN, runs, tmp_path / "out" / "chart.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 10_000
