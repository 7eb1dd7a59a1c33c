"""Renewals keep the stagger: a fleet minted with one expiry gets a spread expiry at renewal
(a fixed renewal lifetime plus each device's stable offset into the renewal window), the
default copy keeps each device's minted length, and a stagger without a fixed lifetime is
refused."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlalchemy import Engine

from fleetcore.errors import ConfigError
from registry.renewal import CertificateRenewer
from registry.settings import build_settings
from tests.registry.test_renewal import _csr, _register, engine  # noqa: F401
from tests.support.pki import TestPKI

DEVICES = 120
WINDOW = dt.timedelta(hours=6)


def test_a_fleet_minted_with_one_expiry_is_spread_at_renewal(
    pki: TestPKI,
    engine: Engine,  # noqa: F811
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ids = [f"dev-stagger-{i:03d}" for i in range(DEVICES)]
    for device_id in ids:
        _register(pki, engine, device_id, not_before=now, not_after=now + dt.timedelta(days=30))
    renewer = CertificateRenewer(
        pki.ca, engine, min_interval_s=0, lifetime=dt.timedelta(days=1), stagger=WINDOW
    )
    renewed = {d: renewer.renew(d, _csr(d)) for d in ids}

    lengths = {d: r.not_after - r.not_before for d, r in renewed.items()}
    offsets = {d: length - dt.timedelta(days=1) for d, length in lengths.items()}
    assert all(dt.timedelta(0) <= o < WINDOW for o in offsets.values())
    assert max(offsets.values()) - min(offsets.values()) > WINDOW * 0.9
    # Roughly even: no hour of the window holds more than twice its share.
    per_hour = Counter(int(o.total_seconds() // 3600) for o in offsets.values())
    assert len(per_hour) == 6 and max(per_hour.values()) <= 2 * DEVICES / 6

    # The offset is the device's own: renewing again lands at the same place in the window.
    again = renewer.renew(ids[0], _csr(ids[0]))
    assert again.not_after - again.not_before == lengths[ids[0]]


def test_the_default_copy_keeps_each_devices_minted_length(
    pki: TestPKI,
    engine: Engine,  # noqa: F811
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    minted = {f"dev-copy-{i}": dt.timedelta(days=30, hours=5 * i) for i in range(4)}
    for device_id, length in minted.items():
        _register(pki, engine, device_id, not_before=now, not_after=now + length)
    renewer = CertificateRenewer(pki.ca, engine)
    for device_id, length in minted.items():
        renewed = renewer.renew(device_id, _csr(device_id))
        assert renewed.not_after - renewed.not_before == length


def test_a_renewal_stagger_without_a_fixed_lifetime_is_refused() -> None:
    with pytest.raises(ConfigError, match="RENEWAL_LIFETIME_DAYS"):
        build_settings(registry_renewal_stagger_s=3600)
    settings = build_settings(registry_renewal_stagger_s=3600, registry_renewal_lifetime_days=30)
    assert settings.registry_renewal_stagger_s == 3600
