"""The revocation feed's wire format: one definition, served by the registry, read by the broker."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pydantic import ValidationError

import broker.revocation
import registry.api.routes.revocations
import registry.store.revocations
from fleetcore.revocation_feed import RevocationEvent, RevocationFeed

EVENT = {
    "seq": 1,
    "device_id": "dev-1",
    "serials": ["ABCDEF01"],
    "reason": "retired",
    "revoked_at": "2026-01-02T03:04:05",
}


def test_both_sides_use_the_one_definition() -> None:
    for module in (broker.revocation, registry.store.revocations, registry.api.routes.revocations):
        assert vars(module)["RevocationFeed"] is RevocationFeed, module.__name__


def test_serials_are_lower_case_and_naive_times_are_utc() -> None:
    feed = RevocationFeed.model_validate_json(
        json.dumps({"events": [EVENT], "last_seq": 1, "head_seq": 1, "epoch": 7})
    )
    (event,) = feed.events
    assert event.serials == ["abcdef01"]
    assert event.revoked_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert event.reason_code == "cessationOfOperation"


@pytest.mark.parametrize(
    "bad",
    [
        {k: v for k, v in EVENT.items() if k != "serials"},
        {**EVENT, "seq": "one"},
        {**EVENT, "reason_code": "certificateHold"},
        {**EVENT, "revoked_at": "yesterday"},
    ],
)
def test_a_malformed_event_is_refused_as_a_value_error(bad: dict[str, object]) -> None:
    # The broker's follower retries on ValueError (ValidationError is one) and applies nothing.
    with pytest.raises(ValidationError):
        RevocationEvent.model_validate(bad)
    assert issubclass(ValidationError, ValueError)
