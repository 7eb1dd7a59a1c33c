"""fleetcore.renewal_wire: the answer on cert/issued, built by the registry, read by devices."""

from __future__ import annotations

import json

import pytest

from fleetcore.profile import IdentityKind
from fleetcore.renewal_wire import (
    RETRYABLE_REFUSALS,
    AnswerError,
    Confirmed,
    Refusal,
    RefusalCode,
    confirm_payload,
    confirmed_payload,
    parse_answer,
    refusal_payload,
)
from tests.support.pki import TestPKI


def test_the_refusal_codes_are_the_wire_contract() -> None:
    assert {code.value for code in RefusalCode} == {
        "bad_topic",
        "too_large",
        "invalid_csr",
        "identity_mismatch",
        "unknown_device",
        "device_decommissioned",
        "rate_limited",
        "busy",
        "registry_unavailable",
        "internal_error",
        "invalid_confirm",
        "unknown_serial",
        "certificate_revoked",
        "not_newest",
    }


def test_a_refusal_round_trips() -> None:
    payload = refusal_payload(RefusalCode.RATE_LIMITED, "retry in 3 s")
    assert json.loads(payload) == {"error": "rate_limited", "message": "retry in 3 s"}
    assert parse_answer(payload) == Refusal("rate_limited", "retry in 3 s")


def test_a_certificate_answer_is_read(pki: TestPKI) -> None:
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, "wire-1"))
    parsed = parse_answer(b"\n" + issued.certificate_pem)
    assert not isinstance(parsed, Refusal)
    assert parsed.serial_number == issued.certificate.serial_number


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a readable"),
        (b"{}", "unreadable answer"),
        (b"[1, 2]", "unreadable answer"),
        (b"\xff\xfe", "unreadable answer"),
    ],
)
def test_anything_else_is_an_answer_error(payload: bytes, message: str) -> None:
    with pytest.raises(AnswerError, match=message):
        parse_answer(payload)


def test_a_confirm_round_trips_and_is_told_apart_from_a_csr() -> None:
    from fleetcore.renewal_wire import (
        Confirmed,
        confirm_payload,
        confirmed_payload,
        is_confirm,
        parse_confirm,
    )

    payload = confirm_payload("ABCDEF01")
    assert is_confirm(payload) and not is_confirm(b"-----BEGIN CERTIFICATE REQUEST-----")
    assert parse_confirm(payload) == "abcdef01"
    assert parse_answer(confirmed_payload("abcdef01")) == Confirmed("abcdef01")
    refusal = refusal_payload(RefusalCode.NOT_NEWEST, "confirm the newest")
    assert parse_answer(refusal) == Refusal("not_newest", "confirm the newest")


@pytest.mark.parametrize(
    "payload", [b'{"confirm": 42}', b"{nope", b'{"confirm": "xyz"}', b'["confirm"]', b"{" * 300]
)
def test_a_malformed_confirm_is_a_confirm_error(payload: bytes) -> None:
    from fleetcore.renewal_wire import ConfirmError, parse_confirm

    with pytest.raises(ConfirmError, match="confirm"):
        parse_confirm(payload)


def test_a_confirm_and_its_answer_round_trip() -> None:
    assert json.loads(confirm_payload("0A1B")) == {"confirm": "0a1b"}
    assert parse_answer(confirmed_payload("0a1b")) == Confirmed("0a1b")
    assert RefusalCode.RATE_LIMITED in RETRYABLE_REFUSALS
    assert RefusalCode.DEVICE_DECOMMISSIONED not in RETRYABLE_REFUSALS
