"""The pre-enrollment webhook on a real HTTPS registry, asked over real HTTP on 127.0.0.1:
allow, deny, pending (202 + Retry-After), and failing closed on a timeout, an error status,
an answer that is no decision and a webhook that is not listening; the registry-wide one and
a claim's own (``claim create --webhook``), alone and together."""

from __future__ import annotations

import datetime as dt
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session

from factory.claims import AllowEntry, mint_claim
from fleetcore.profile import IdentityKind, read_identity
from registry.est.models import Claim
from registry.models import Device
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.conftest import TestPKI
from tests.registry.conftest import Clients, unique_id
from tests.registry.est_client import (
    ClaimFiles,
    csr_der,
    enroll,
    est_client,
    make_claim,
    parse_certs_only,
)
from tests.support.webhook import WebhookAnswer, WebhookServer, webhook_server

TIMEOUT_S = 0.5
DAY = dt.timedelta(days=1)


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    with webhook_server() as server:
        yield server


def _registry(settings: RegistrySettings, url: str) -> RegistryServer:
    return RegistryServer(
        settings.model_copy(
            update={
                "registry_est_webhook_url": url,
                "registry_est_webhook_timeout_s": TIMEOUT_S,
                "registry_est_webhook_retry_after_s": 45,
            }
        )
    )


@pytest.fixture
def hooked(registry_settings: RegistrySettings, webhook: WebhookServer) -> Iterator[RegistryServer]:
    """A registry asking ``webhook`` before every claim enrollment."""
    with _registry(registry_settings, webhook.url) as server:
        yield server


def _claim(pki: TestPKI, registry: RegistryServer, folder: Path, **kwargs: object) -> ClaimFiles:
    with Clients(pki, registry.url, []).of(IdentityKind.SERVICE, "factory") as factory:
        return make_claim(pki, factory, folder, unique_id("batch"), **kwargs)  # type: ignore[arg-type]


def _enroll(
    pki: TestPKI, registry: RegistryServer, claim: ClaimFiles, device_id: str, serial: str | None
) -> httpx.Response:
    der, _ = csr_der(device_id=device_id, hardware_serial=serial)
    with est_client(pki, registry.url, (claim.cert, claim.key)) as est:
        return enroll(est, der)


def _nothing_issued(registry: RegistryServer, claim: ClaimFiles, device_id: str) -> None:
    with Session(registry.state.engine) as session:
        assert session.get(Device, device_id) is None
        row = session.get(Claim, claim.batch)
        assert row is not None and row.enrolled == 0


def test_the_webhook_is_told_who_enrolls_and_its_allow_lets_the_device_in(
    pki: TestPKI, hooked: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    device_id, serial = unique_id(), unique_id("SN")
    claim = _claim(pki, hooked, tmp_path, allow=[AllowEntry(device_id, serial)])
    (certificate,) = parse_certs_only(_enroll(pki, hooked, claim, device_id, serial))
    assert read_identity(certificate).name == device_id
    (question,) = webhook.received
    assert question["device_id"] == device_id and question["hardware_serial"] == serial
    assert question["claim"] == claim.batch
    assert question["claim_serial"] == format(claim.serial, "x")
    assert question["from"].startswith("127.0.0.1:")


def test_the_webhook_denies_a_device_with_its_reason_and_403(
    pki: TestPKI, hooked: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    claim = _claim(pki, hooked, tmp_path)
    device_id = unique_id()
    webhook.answer_json({"decision": "deny", "reason": "serial reported stolen"})
    response = _enroll(pki, hooked, claim, device_id, None)
    assert response.status_code == 403, response.text
    assert "refused" in response.text and "serial reported stolen" in response.text
    webhook.answer = WebhookAnswer(403, b"not in today's shipment")
    response = _enroll(pki, hooked, claim, device_id, None)
    assert response.status_code == 403 and "not in today's shipment" in response.text
    _nothing_issued(hooked, claim, device_id)


def test_pending_approval_answers_202_with_retry_after_then_the_retry_enrolls(
    pki: TestPKI, hooked: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    claim = _claim(pki, hooked, tmp_path)
    device_id = unique_id()
    der, key = csr_der(device_id=device_id)
    with est_client(pki, hooked.url, (claim.cert, claim.key)) as est:
        webhook.answer_json({"decision": "pending", "retry_after_s": 30})
        first = enroll(est, der)
        webhook.answer = WebhookAnswer(202, b"", {"Retry-After": "7"})
        second = enroll(est, der)
        webhook.answer_json({"decision": "pending"})
        third = enroll(est, der)
        _nothing_issued(hooked, claim, device_id)
        webhook.answer_json({"decision": "allow"})
        (certificate,) = parse_certs_only(enroll(est, der))
    assert (first.status_code, first.headers["retry-after"]) == (202, "30"), first.text
    assert "awaits approval" in first.text
    assert (second.status_code, second.headers["retry-after"]) == (202, "7")
    assert (third.status_code, third.headers["retry-after"]) == (202, "45")  # the default
    assert certificate.public_key() == key.public_key()
    assert len(webhook.received) == 4


def test_a_webhook_that_does_not_answer_in_time_refuses_within_the_bound(
    pki: TestPKI, hooked: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    claim = _claim(pki, hooked, tmp_path)
    device_id = unique_id()
    webhook.answer = WebhookAnswer(hang=True)
    started = time.monotonic()
    response = _enroll(pki, hooked, claim, device_id, None)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert f"no answer within {TIMEOUT_S:g} s" in response.text and "fails closed" in response.text
    assert response.headers["retry-after"] == "10"
    assert elapsed < TIMEOUT_S + 10  # bounded: the hung webhook holds its answer for 30 s
    _nothing_issued(hooked, claim, device_id)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (WebhookAnswer(500, b"oops"), "answered HTTP 500"),
        (WebhookAnswer(200, b"yes please"), "is not JSON"),
        (WebhookAnswer(200, b'{"decision": "maybe"}'), "is not JSON"),
        (WebhookAnswer(302, b"", {"Location": "http://127.0.0.1:1/"}), "answered HTTP 302"),
    ],
)
def test_a_webhook_answering_anything_but_a_decision_fails_closed(
    pki: TestPKI,
    hooked: RegistryServer,
    webhook: WebhookServer,
    tmp_path: Path,
    answer: WebhookAnswer,
    words: str,
) -> None:
    claim = _claim(pki, hooked, tmp_path)
    device_id = unique_id()
    webhook.answer = answer
    response = _enroll(pki, hooked, claim, device_id, None)
    assert response.status_code == 503, response.text
    assert words in response.text and webhook.url in response.text
    _nothing_issued(hooked, claim, device_id)


def test_a_webhook_that_is_not_listening_fails_closed(
    pki: TestPKI, registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{placeholder.getsockname()[1]}/check"
    with _registry(registry_settings, url) as registry:
        claim = _claim(pki, registry, tmp_path)
        device_id = unique_id()
        response = _enroll(pki, registry, claim, device_id, None)
        assert response.status_code == 503, response.text
        assert "ConnectError" in response.text and "fails closed" in response.text
        _nothing_issued(registry, claim, device_id)


def test_the_allow_list_refuses_before_the_webhook_is_asked(
    pki: TestPKI, hooked: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    claim = _claim(pki, hooked, tmp_path, allow=[AllowEntry(unique_id(), None)])
    response = _enroll(pki, hooked, claim, unique_id(), None)
    assert response.status_code == 403 and "allow-list" in response.text
    assert webhook.received == []


# -- a claim's own webhook ------------------------------------------------------------------


def _own(
    pki: TestPKI, registry: RegistryServer, folder: Path, url: str, **kwargs: object
) -> ClaimFiles:
    """A claim whose own webhook is ``url``."""
    return _claim(pki, registry, folder, webhook_url=url, **kwargs)


def _unlistened_url() -> str:
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{placeholder.getsockname()[1]}/check?token=s3cret"


@pytest.fixture
def quick(registry_settings: RegistrySettings) -> Iterator[RegistryServer]:
    """A registry without a registry-wide webhook, with the short time bound."""
    with _registry(registry_settings, "") as server:
        yield server


def test_a_claims_own_webhook_is_asked_and_its_allow_enrolls(
    pki: TestPKI, quick: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    claim = _own(pki, quick, tmp_path, webhook.url)
    device_id = unique_id()
    (certificate,) = parse_certs_only(_enroll(pki, quick, claim, device_id, None))
    assert read_identity(certificate).name == device_id
    (question,) = webhook.received
    assert (question["device_id"], question["claim"]) == (device_id, claim.batch)
    with Session(quick.state.engine) as session:
        row = session.get(Claim, claim.batch)
        assert row is not None and row.enrolled == 1 and row.webhook_url == webhook.url


def test_a_claims_own_webhook_denies_with_its_reason(
    pki: TestPKI, quick: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    claim = _own(pki, quick, tmp_path, webhook.url)
    device_id = unique_id()
    webhook.answer_json({"decision": "deny", "reason": "not in this shipment"})
    response = _enroll(pki, quick, claim, device_id, None)
    assert response.status_code == 403, response.text
    assert f"claim {claim.batch}'s pre-enrollment webhook refused" in response.text
    assert "not in this shipment" in response.text
    _nothing_issued(quick, claim, device_id)


def test_a_claims_own_webhook_that_hangs_refuses_within_the_bound(
    pki: TestPKI, quick: RegistryServer, webhook: WebhookServer, tmp_path: Path
) -> None:
    claim = _own(pki, quick, tmp_path, webhook.url)
    device_id = unique_id()
    webhook.answer = WebhookAnswer(hang=True)
    started = time.monotonic()
    response = _enroll(pki, quick, claim, device_id, None)
    assert time.monotonic() - started < TIMEOUT_S + 10  # the webhook holds its answer 30 s
    assert response.status_code == 503, response.text
    assert f"no answer within {TIMEOUT_S:g} s" in response.text and "fails closed" in response.text
    _nothing_issued(quick, claim, device_id)


def test_a_claims_own_webhook_that_is_unreachable_refuses_without_showing_its_token(
    pki: TestPKI, quick: RegistryServer, tmp_path: Path
) -> None:
    url = _unlistened_url()
    claim = _own(pki, quick, tmp_path, url)
    device_id = unique_id()
    response = _enroll(pki, quick, claim, device_id, None)
    assert response.status_code == 503, response.text
    assert "ConnectError" in response.text and "fails closed" in response.text
    assert url.split("?")[0] + "?..." in response.text and "s3cret" not in response.text
    _nothing_issued(quick, claim, device_id)


def test_with_both_webhooks_each_must_allow(
    pki: TestPKI, registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    with (
        webhook_server() as registry_wide,
        webhook_server() as own,
        _registry(registry_settings, registry_wide.url) as registry,
    ):
        claim = _own(pki, registry, tmp_path, own.url)
        first, second = unique_id(), unique_id()
        own.answer_json({"decision": "deny", "reason": "claim owner says no"})
        refused = _enroll(pki, registry, claim, first, None)
        own.answer_json({"decision": "allow"})
        enrolled = _enroll(pki, registry, claim, second, None)
    assert refused.status_code == 403 and "claim owner says no" in refused.text
    assert enrolled.status_code == 200, enrolled.text
    assert [q["device_id"] for q in registry_wide.received] == [first, second]
    assert [q["device_id"] for q in own.received] == [first, second]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://approvals.example/check", "use https"),
        ("https://user:pw@approvals.example/check", "user name or password"),
        ("gopher://127.0.0.1/check", "is not https://host"),
    ],
)
def test_the_registry_refuses_a_claim_with_an_unusable_webhook_url(
    pki: TestPKI, quick: RegistryServer, url: str, words: str
) -> None:
    _issued, record = mint_claim(pki.ca, unique_id("batch"), quota=1, lifetime=DAY, allow=[])
    body = {**record.as_json(), "webhook_url": url}
    with Clients(pki, quick.url, []).of(IdentityKind.SERVICE, "factory") as factory:
        response = factory.post("/claims", json=body)
    assert response.status_code == 422, response.text
    assert words in response.text


def test_serverkeygen_is_not_offered_and_says_so(pki: TestPKI, hooked: RegistryServer) -> None:
    with est_client(pki, hooked.url) as est:
        plain = est.post("/serverkeygen", content=b"")
        labelled = est.post("/line-7/serverkeygen", content=b"")
    for response in (plain, labelled):
        assert response.status_code == 501, response.text
        assert "the device makes its own key" in response.text
