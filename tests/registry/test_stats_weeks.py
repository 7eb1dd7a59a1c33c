"""Expiries per week (``stats.stats``) at the week edges and past one statement's 100 weeks."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable

import httpx
from sqlmodel import Session

from factory.ca import IssuedCertificate
from registry.server import RegistryServer
from registry.store import stats
from tests.support.pki import pem

Mint = Callable[..., IssuedCertificate]


def test_expiries_per_week_match_a_count_by_monday(
    operator: httpx.Client, mint: Mint, registry: RegistryServer
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    next_monday = dt.datetime.combine(
        now.date() + dt.timedelta(days=7 - now.weekday()), dt.time(), tzinfo=dt.UTC
    )
    not_afters = [
        now + dt.timedelta(hours=1),
        next_monday - dt.timedelta(seconds=1),  # the last second of this week
        next_monday,  # the first second of the next one
        next_monday + dt.timedelta(weeks=99, days=6),
        next_monday + dt.timedelta(weeks=100),  # the second statement's first week
        next_monday + dt.timedelta(weeks=150, hours=5),
    ]
    certificates = [mint(f"wk-{i}", not_after=t) for i, t in enumerate(not_afters)]
    expired = mint(
        "wk-expired",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    body = {"devices": [{"certificate_pem": pem(c)} for c in [*certificates, expired]]}
    assert operator.post("/devices/batch", json=body).status_code == 200
    assert operator.post("/devices/wk-5/decommission", json={"reason": "x"}).status_code == 200

    expected = Counter(
        (t.date() - dt.timedelta(days=t.weekday())).isoformat() for t in not_afters[:5]
    )
    with Session(registry.state.engine) as session:
        weeks = stats.stats(session, now).expiries_per_week
    assert [(w.week_start.isoformat(), w.count) for w in weeks] == sorted(expected.items())
    assert operator.get("/stats").json()["expiries_per_week"] == [
        {"week_start": day, "count": count} for day, count in sorted(expected.items())
    ]
