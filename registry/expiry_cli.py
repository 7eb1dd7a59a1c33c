"""`certfleet registry expiry-report`: the fleet's expiry, live from the registry.

A REST client of ``GET /api/v1/expiry`` (as every operator command: a token or an operator
certificate, audited by the registry as any call). Prints the buckets (expired, <7d, <30d,
<90d, later) and the expired and soonest devices as tables, or the API's JSON (``--json``);
``--png FILE`` draws the histogram of not_after over time with matplotlib.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from registry.cli_options import DataDir
from registry.operator_cli import (
    AsJson,
    Operator,
    RegistryUrl,
    Token,
    call,
    format_when,
    operator_client,
    print_table,
)

__all__ = ["expiry_report", "render_histogram"]


def render_histogram(report: dict[str, Any], path: Path) -> Path:
    """The histogram of not_after of ``report`` (the API's JSON) as a PNG at ``path``."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache chatter
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    bins = report["histogram"]
    starts = [dt.datetime.fromisoformat(b["start"]) for b in bins]
    widths = [dt.datetime.fromisoformat(b["end"]) - s for b, s in zip(bins, starts, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(9, 4), dpi=100)
    try:
        axes.bar(
            starts,  # type: ignore[arg-type]
            [b["count"] for b in bins],
            width=[w.total_seconds() / 86400 for w in widths],
            align="edge",
        )
        now = dt.datetime.fromisoformat(report["generated_at"])
        axes.axvline(now, color="red", linestyle="--", label="now")  # type: ignore[arg-type]
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d %H:%M"))  # type: ignore[no-untyped-call]
        figure.autofmt_xdate()
        axes.set_title(
            f"Current certificates of {report['active_devices']} active devices by not_after"
        )
        axes.set_xlabel("not_after (UTC)")
        axes.set_ylabel("devices")
        axes.legend()
        figure.savefig(path, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def expiry_report(
    png: Annotated[
        Path | None, typer.Option("--png", help="write the histogram of not_after to FILE")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, max=1000, help="devices listed per table")
    ] = 20,
    data_dir: DataDir = None,
    registry: RegistryUrl = None,
    token: Token = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """Expiry of the current certificates of active devices (renewals included)."""
    client = operator_client(data_dir=data_dir, registry=registry, token=token, operator=operator)
    report = call(client, "GET", "/expiry", params={"limit": limit})
    if png is not None:
        render_histogram(report, png)
    if as_json:
        typer.echo(json.dumps(report | ({"png": str(png)} if png else {}), indent=2))
        return
    buckets = Table("EXPIRES", "DEVICES", title=f"{report['active_devices']} active devices")
    for name, count in report["buckets"].items():
        buckets.add_row(name, str(count))
    print_table(buckets)
    typer.echo(f"next expiry: {format_when(report['next_expiry'])}")
    if report.get("by_issuer"):
        issuers = Table("ISSUING CA (KEY ID)", "DEVICES", title="devices by issuing CA")
        for key_id, count in sorted(report["by_issuer"].items()):
            issuers.add_row(key_id, str(count))
        print_table(issuers)
    for title, rows in (("expired", report["expired"]), ("expiring soonest", report["soonest"])):
        if not rows:
            continue
        table = Table("DEVICE", "NOT AFTER", title=title)
        for row in rows:
            table.add_row(row["device_id"], format_when(row["not_after"]))
        print_table(table)
    if png is not None:
        typer.echo(f"histogram: {png}")
