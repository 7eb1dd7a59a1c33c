"""RenewalEvent: the record the lifecycle benchmark reads, as objects and as JSON lines."""

from __future__ import annotations

from pathlib import Path

from device_sim.renewal_events import RenewalEvent, RenewalOutcome, read_renewal_events


def test_renewal_events_survive_a_round_trip_through_json_lines(tmp_path: Path) -> None:
    events = [
        RenewalEvent(
            "dev-1",
            RenewalOutcome.RENEWED,
            1_800_000_000.5,
            "0a",
            serial="0b",
            not_after="2027-01-01T00:00:00+00:00",
            latency_ms=12.5,
            total_ms=2400.0,
            attempts=2,
            retried=1,
            refused=("rate_limited",),
            confirmed=True,
        ),
        RenewalEvent("dev-2", RenewalOutcome.EXPIRED_BEFORE_RENEWAL, 1_800_000_001.0, "0c"),
    ]
    log = tmp_path / "renewals.jsonl"
    log.write_text("".join(event.json_line() for event in events))
    assert read_renewal_events(log) == events
    assert events[0].as_dict()["outcome"] == "renewed"
    assert events[0].as_dict()["refused"] == ["rate_limited"]
