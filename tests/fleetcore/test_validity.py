"""fleetcore.validity: the one validity policy for provisioning, sign-csr and renewal."""

from __future__ import annotations

import datetime as dt

from fleetcore.profile import CLOCK_SKEW
from fleetcore.validity import Validity, new_validity, renewal_validity

ISSUED = dt.datetime(2026, 12, 1, 12, 30, 15, 987654, tzinfo=dt.UTC)
WHOLE = ISSUED.replace(microsecond=0)
YEAR = dt.timedelta(days=365)
WINDOW = dt.timedelta(days=90)


def test_a_new_certificate_starts_before_its_issue_time_and_lasts_its_lifetime() -> None:
    assert new_validity(ISSUED, YEAR) == Validity(WHOLE - CLOCK_SKEW, WHOLE + YEAR)


def test_a_new_certificate_ends_at_its_place_in_the_stagger_window() -> None:
    validity = new_validity(ISSUED, YEAR, stagger=WINDOW, fraction=0.5)
    assert validity.not_after == WHOLE + YEAR + WINDOW / 2
    assert new_validity(ISSUED, YEAR, stagger=dt.timedelta(0), fraction=0.5).not_after == (
        WHOLE + YEAR
    )
    last = new_validity(ISSUED, YEAR, stagger=WINDOW, fraction=0.999999999)
    assert WHOLE + YEAR < last.not_after < WHOLE + YEAR + WINDOW


def test_a_batch_expires_from_its_start_while_each_chunk_starts_when_minted() -> None:
    batch_start = ISSUED - dt.timedelta(hours=2, microseconds=5)
    validity = new_validity(ISSUED, YEAR, expiry_base=batch_start)
    assert validity.not_before == WHOLE - CLOCK_SKEW
    assert validity.not_after == batch_start.replace(microsecond=0) + YEAR


def test_a_renewed_certificate_keeps_its_length_and_can_be_staggered() -> None:
    length = dt.timedelta(days=40, minutes=5)
    renewed = renewal_validity(ISSUED, length)
    assert renewed == Validity(WHOLE - CLOCK_SKEW, WHOLE - CLOCK_SKEW + length)
    staggered = renewal_validity(ISSUED, length, stagger=dt.timedelta(days=10), fraction=0.25)
    assert staggered.not_after - staggered.not_before == length + dt.timedelta(days=2.5)
