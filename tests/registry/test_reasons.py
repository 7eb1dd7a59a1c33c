"""Revocation reason codes (issue 16.2): in the feed, the CRL entry and stored per
certificate for OCSP; rows from before 0003 read as cessationOfOperation."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography import x509
from sqlalchemy import text
from sqlmodel import Session

from factory.ca import IssuedCertificate
from fleetcore.profile import serial_hex
from registry.db import make_engine, migrate
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from registry.store import certificates, revocations
from tests.support.pki import pem, unique_id

Mint = Callable[..., IssuedCertificate]


def _crl_entry(operator: httpx.Client, serial: int) -> x509.RevokedCertificate:
    deadline = time.monotonic() + 10
    while True:
        crl = x509.load_der_x509_crl(operator.get("/crl.der").content)
        entry = crl.get_revoked_certificate_by_serial_number(serial)
        if entry is not None:
            return entry
        assert time.monotonic() < deadline, "serial never reached the CRL"
        time.sleep(0.05)


def test_reason_code_reaches_feed_crl_and_certificate_status(
    registry: RegistryServer, operator: httpx.Client, mint: Mint
) -> None:
    reasons = {
        "keyCompromise": x509.ReasonFlags.key_compromise,
        "superseded": x509.ReasonFlags.superseded,
    }
    reasons[""] = x509.ReasonFlags.cessation_of_operation  # no reason_code: the default
    for code, flag in reasons.items():
        device_id = unique_id()
        issued = mint(device_id)
        assert operator.post("/devices", json={"certificate_pem": pem(issued)}).status_code == 201
        body = {"reason": "test"} | ({"reason_code": code} if code else {})
        answer = operator.post(f"/devices/{device_id}/decommission", json=body)
        assert answer.status_code == 200, answer.text
        expected = code or "cessationOfOperation"
        assert answer.json()["certificates"][0]["revocation_reason"] == expected
        seq = answer.json()["revocation_seq"]
        [event] = operator.get("/revocations", params={"after": seq - 1, "limit": 1}).json()[
            "events"
        ]
        assert event["reason_code"] == expected
        entry = _crl_entry(operator, issued.certificate.serial_number)
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == flag
        with Session(registry.state.engine) as session:
            status = certificates.certificate_status(
                session, serial_hex(issued.certificate.serial_number)
            )
        assert status is not None
        assert (status.status, status.reason_code) == ("revoked", expected)


def test_0003_gives_older_revocations_the_default_reason(database_url: str, tmp_path: Path) -> None:
    engine = make_engine(RegistrySettings(data_dir=tmp_path, registry_database_url=database_url))
    try:
        migrate(engine, "0002")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO device (device_id, status, created_at) "
                    "VALUES ('old-dev', 'decommissioned', CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO certificate (serial, device_id, not_before, not_after, status, "
                    "revoked_at, certificate_pem) VALUES ('0a', 'old-dev', CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP, 'revoked', CURRENT_TIMESTAMP, 'x')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO revocation (seq, device_id, serials, reason, revoked_at, "
                    "operator) VALUES (1, 'old-dev', '[\"0a\"]', 'old', CURRENT_TIMESTAMP, 'op')"
                )
            )
        migrate(engine)
        with Session(engine) as session:
            [event] = revocations.revocations_after(session, 0, 10).events
            status = certificates.certificate_status(session, "0a")
        assert event.reason_code == "cessationOfOperation"
        assert status is not None and status.reason_code == "cessationOfOperation"
    finally:
        engine.dispose()
