"""fleetcore.renewal_wire: the answer on cert/issued, built by the registry, read by devices."""

from __future__ import annotations

import json

import pytest

from fleetcore.profile import IdentityKind
from fleetcore.renewal_wire import (
    AnswerError,
    Refusal,
    RefusalCode,
    parse_answer,
    refusal_payload,
)
from tests.conftest import TestPKI


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
