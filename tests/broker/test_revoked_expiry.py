"""The broker's revoked set forgets a serial only once its certificate has expired past the
clock-skew margin (it cannot be presented any more), on load and when pruned; serials whose
not_after the feed did not give, and decommissioned devices, are kept for good."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from broker.revoked_set import RevokedSet
from broker.serial_table import FOREVER
from fleetcore.profile import CLOCK_SKEW

SKEW_S = CLOCK_SKEW.total_seconds()


def _at(offset_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(time.time() + offset_s, tz=dt.UTC)


def test_prune_drops_only_serials_expired_past_the_skew(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    revoked.add(["aa"], "dev-a", 1, {"aa": _at(-SKEW_S + 30)})  # expired, still within skew
    revoked.add(["bb"], "dev-b", 2, {"bb": _at(3600)})
    revoked.add(["cc"], "dev-c", 3)  # no not_after: kept for good
    assert revoked.prune() == []
    assert revoked.hex_serials() == {"aa", "bb", "cc"}

    assert revoked.prune(now=time.time() + 60) == ["aa"]
    assert revoked.hex_serials() == {"bb", "cc"}
    assert revoked.device_ids == {"dev-a", "dev-b", "dev-c"}  # decommissioned for good
    assert revoked.prune(now=time.time() + 10 * 365 * 86400) == ["bb"]
    assert revoked.hex_serials() == {"cc"}


def test_an_event_of_an_expired_certificate_adds_nothing(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path)
    new = revoked.add(["dd", "ee"], "dev-d", 4, {"dd": _at(-SKEW_S - 5), "ee": _at(60)})
    assert new == ["ee"] and revoked.hex_serials() == {"ee"}
    assert revoked.is_device_decommissioned("dev-d")


def test_an_old_json_file_is_migrated_pruned_with_its_not_after(tmp_path: Path) -> None:
    path = tmp_path / "revoked-broker.json"
    later = time.time() + 600
    path.write_text(
        json.dumps(
            {
                "last_seq": 9,
                "serials": ["a1", "a2", "a3"],
                "device_ids": ["dev-1"],
                "not_after": {"a1": time.time() - SKEW_S - 10, "a2": later},
            }
        )
    )
    revoked = RevokedSet(tmp_path)
    revoked.load()
    assert revoked.hex_serials() == {"a2", "a3"}
    again = RevokedSet(tmp_path)  # from the snapshot the migration wrote
    again.load()
    assert again.hex_serials() == {"a2", "a3"}
    assert again.table.expiry_of("a2") == int(later)
    assert again.table.expiry_of("a3") == FOREVER  # kept for good
    assert again.last_seq == 9 and again.device_ids == {"dev-1"}


def test_a_file_from_a_broker_without_not_after_loads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "revoked-broker.json"
    path.write_text(json.dumps({"last_seq": 2, "serials": ["0A", "0b"], "device_ids": []}))
    revoked = RevokedSet(tmp_path)
    revoked.load()
    assert revoked.hex_serials() == {"a", "b"}  # serials are numbers: hex as serial_hex
    assert revoked.prune(now=time.time() + 10 * 365 * 86400) == []
