"""The broker's revoked set forgets a serial only once its certificate has expired past the
clock-skew margin (it cannot be presented any more), on load and when pruned; serials whose
not_after the feed did not give, and decommissioned devices, are kept for good."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from broker.revocation import RevokedSet
from fleetcore.profile import CLOCK_SKEW

SKEW_S = CLOCK_SKEW.total_seconds()


def _at(offset_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(time.time() + offset_s, tz=dt.UTC)


def test_prune_drops_only_serials_expired_past_the_skew(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path / "revoked.json")
    revoked.add(["aa"], "dev-a", 1, {"aa": _at(-SKEW_S + 30)})  # expired, still within skew
    revoked.add(["bb"], "dev-b", 2, {"bb": _at(3600)})
    revoked.add(["cc"], "dev-c", 3)  # no not_after: kept for good
    assert revoked.prune() == []
    assert revoked.serials == {"aa", "bb", "cc"}

    assert revoked.prune(now=time.time() + 60) == ["aa"]
    assert revoked.serials == {"bb", "cc"}
    assert revoked.device_ids == {"dev-a", "dev-b", "dev-c"}  # decommissioned for good
    assert revoked.prune(now=time.time() + 10 * 365 * 86400) == ["bb"]
    assert revoked.serials == {"cc"}


def test_an_event_of_an_expired_certificate_adds_nothing(tmp_path: Path) -> None:
    revoked = RevokedSet(tmp_path / "revoked.json")
    new = revoked.add(["dd", "ee"], "dev-d", 4, {"dd": _at(-SKEW_S - 5), "ee": _at(60)})
    assert new == ["ee"] and revoked.serials == {"ee"}
    assert revoked.is_device_decommissioned("dev-d")


def test_load_prunes_expired_serials_and_save_keeps_not_after(tmp_path: Path) -> None:
    path = tmp_path / "revoked-broker.json"
    path.write_text(
        json.dumps(
            {
                "last_seq": 9,
                "serials": ["01", "02", "03"],
                "device_ids": ["dev-1"],
                "not_after": {"01": time.time() - SKEW_S - 10, "02": time.time() + 600},
            }
        )
    )
    revoked = RevokedSet(path)
    revoked.load()
    assert revoked.serials == {"02", "03"}
    assert revoked.save()
    body = json.loads(path.read_text())
    assert body["serials"] == ["02", "03"]
    assert set(body["not_after"]) == {"02"}
    assert body["last_seq"] == 9 and body["device_ids"] == ["dev-1"]


def test_a_file_from_a_broker_without_not_after_loads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "revoked-broker.json"
    path.write_text(json.dumps({"last_seq": 2, "serials": ["0A", "0b"], "device_ids": []}))
    revoked = RevokedSet(path)
    revoked.load()
    assert revoked.serials == {"0a", "0b"} and revoked.not_after == {}
    assert revoked.prune(now=time.time() + 10 * 365 * 86400) == []
