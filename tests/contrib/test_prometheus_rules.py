"""The Prometheus alerting rules in contrib/prometheus/: valid for promtool, firing on the
series they watch (``promtool test rules``), and naming only metrics that we export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import BrokerMetrics
from fleetcore.clock import utcnow
from registry.db import make_engine, migrate
from registry.metrics import ExpiryCollector, RegistryMetrics
from registry.settings import RegistrySettings
from registry.telemetry import TelemetryIngest
from tests.support.pki import TestPKI

RULES_DIR = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"
RULES = RULES_DIR / "certfleet-alerts.yml"
RULE_TESTS = RULES_DIR / "certfleet-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed: apt install prometheus"
)


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_alert_rules_fire_on_the_series_they_watch() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULES_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _sample_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def _exported_names(pki: TestPKI, tmp_path: Path) -> set[str]:
    layout = pki.registry_data_dir(tmp_path / "data", signing=False)
    settings = RegistrySettings(
        data_dir=layout.root,
        registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        telemetry_broker_addr="127.0.0.1:1",
    )
    engine = make_engine(settings)
    try:
        migrate(engine)
        registry_metrics = RegistryMetrics()
        registry_metrics.registry.register(ExpiryCollector(engine, utcnow, 0))
        # Built, never started: its collector reports the ingest's counters.
        registry_metrics.telemetry.attach(TelemetryIngest(settings, engine))
        # Labelled metrics appear once a label value exists.
        registry_metrics.renewals.labels("issued").inc()
        registry_metrics.confirms.labels("confirmed").inc()
        registry_metrics.task_crashes.labels("supersede").inc()
        names = _sample_names(registry_metrics.registry)
    finally:
        engine.dispose()
    broker_metrics = BrokerMetrics()
    broker_metrics.refusals.labels("revoked").inc()
    broker_metrics.revocation_lag.observe(0.1)
    return names | _sample_names(broker_metrics.registry)


def test_every_metric_in_the_alert_rules_exists(pki: TestPKI, tmp_path: Path) -> None:
    exported = _exported_names(pki, tmp_path)
    rules = yaml.safe_load(RULES.read_text())
    used: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bcertfleet_[a-z0-9_]+", rule["expr"]))
            for text in rule.get("annotations", {}).values():
                used |= set(re.findall(r"\bcertfleet_[a-z0-9_]+", text))
    assert len(used) >= 8, used  # the parse found the rules' metrics
    assert sorted(used - exported) == []
