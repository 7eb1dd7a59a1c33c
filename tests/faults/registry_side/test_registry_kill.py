"""SIGKILL of the registry in the middle of a decommission burst (issue 11, fault suite):
every decommission that was answered 200 is in the feed and the CRL after the restart, and
the feed stays gap-free."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from factory.ca import IssuedCertificate
from fleetcore.profile import IdentityKind
from tests.faults.registry_side.registry_process import registry_process
from tests.support.pki import ClientFiles, TestPKI, pem, unique_id
from tests.support.tls import tls_context

# `alone`: the registry SIGKILLed under load (time bounds).
pytestmark = pytest.mark.alone

Mint = Callable[..., IssuedCertificate]
DEVICES = 120
CLIENTS = 20
KILL_AFTER = 30


def _client(pki: TestPKI, url: str, operator: ClientFiles) -> httpx.Client:
    return httpx.Client(base_url=f"{url}/api/v1", verify=tls_context(pki, operator), timeout=10)


@pytest.mark.slow
def test_sigkill_during_a_burst_loses_no_acknowledged_decommission(
    pki: TestPKI, database_url: str, mint: Mint, tmp_path: Path
) -> None:
    ready = tmp_path / "registry.ready"
    operator = pki.client(IdentityKind.OPERATOR, "alice")
    issued = {unique_id("kill"): None for _ in range(DEVICES)}
    serials = {d: mint(d) for d in issued}
    answers: dict[str, int | str] = {}
    lock = threading.Lock()
    with registry_process(pki, database_url, ready) as registry:
        with _client(pki, registry.url, operator) as http:
            body = {"devices": [{"certificate_pem": pem(c)} for c in serials.values()]}
            assert http.post("/devices/batch", json=body).status_code == 200
        acknowledged = threading.Event()

        def worker(index: int) -> None:
            with _client(pki, registry.url, operator) as http:
                for device_id in list(serials)[index::CLIENTS]:
                    try:
                        status: int | str = http.post(
                            f"/devices/{device_id}/decommission", json={"reason": "kill test"}
                        ).status_code
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    with lock:
                        answers[device_id] = status
                        if sum(s == 200 for s in answers.values()) >= KILL_AFTER:
                            acknowledged.set()
                    if isinstance(status, str):
                        return  # the registry is gone

        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(worker, i) for i in range(CLIENTS)]
            assert acknowledged.wait(60), f"no {KILL_AFTER} answers: {answers}"
            registry.kill()
            for future in futures:
                future.result(60)
    done = {d for d, status in answers.items() if status == 200}
    assert len(done) >= KILL_AFTER
    assert set(answers.values()) <= {200, "ConnectError", "ReadError", "RemoteProtocolError"}, set(
        answers.values()
    )

    with (
        registry_process(pki, database_url, ready) as registry,
        _client(pki, registry.url, operator) as http,
    ):
        # Finish the burst: a device whose answer was lost is either done (409) or not (200).
        for device_id in serials:
            if device_id not in done:
                status = http.post(f"/devices/{device_id}/decommission", json={"reason": "again"})
                assert status.status_code in (200, 409), status.text
        answer = http.get("/revocations", params={"after": 0, "limit": 5000})
        assert answer.status_code == 200, answer.text
        feed = answer.json()
        seqs = [event["seq"] for event in feed["events"]]
        assert seqs == list(range(1, len(seqs) + 1))  # gap-free
        in_feed = [event["device_id"] for event in feed["events"]]
        assert sorted(in_feed) == sorted(serials)  # every device exactly once
        deadline = time.monotonic() + 10
        while True:
            crl = x509.load_der_x509_crl(http.get("/crl.der").content)
            missing = [
                d
                for d, c in serials.items()
                if crl.get_revoked_certificate_by_serial_number(c.certificate.serial_number) is None
            ]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not missing, f"{len(missing)} decommissioned devices missing from the CRL"
