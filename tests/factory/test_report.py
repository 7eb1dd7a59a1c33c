"""`certfleet factory expiry-report`: a table per ISO week and a PNG chart."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from factory.ca import CertificateAuthority
from factory.errors import ProvisionError
from factory.provision import provision_batch
from fleetcore.layout import DataLayout
from tests.factory.conftest import run_factory


def test_expiry_report_json_table_and_png(ca: CertificateAuthority, layout: DataLayout) -> None:
    provision_batch(ca, 60, workers=1, stagger=dt.timedelta(days=28))
    png = layout.root / "report" / "expiry.png"

    result = run_factory(
        ["expiry-report", "--data-dir", str(layout.root), "--png", str(png), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["total"] == 60
    assert sum(week["count"] for week in report["weeks"]) == 60
    assert 4 <= len(report["weeks"]) <= 5
    assert report["weeks"][0]["iso_week"].startswith("20")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = run_factory(["expiry-report", "--data-dir", str(layout.root), "--no-png"])
    assert table.exit_code == 0, table.output
    assert "ISO week" in table.output
    assert report["weeks"][1]["iso_week"] in table.output


def test_expiry_report_without_manifest_is_refused(layout: DataLayout) -> None:
    result = run_factory(["expiry-report", "--data-dir", str(layout.root)])
    assert isinstance(result.exception, ProvisionError)
    with pytest.raises(ProvisionError, match="no manifest at .*provision a batch first"):
        raise result.exception
