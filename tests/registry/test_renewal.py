"""The registry's renewal logic without MQTT: rate limit, lifetime, races and the refusals
the end-to-end tests (tests/e2e/test_renewal.py) cannot provoke cheaply."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlmodel import Session

from factory.ca import IssuedCertificate
from fleetcore.keys import build_csr, generate_key
from fleetcore.profile import Identity, IdentityKind
from registry.certs import parse_device_certificate
from registry.db import make_engine, migrate
from registry.renewal import CertificateRenewer, RenewalRefused
from registry.renewal_service import RenewalService
from registry.settings import RegistrySettings
from registry.store import audit, devices, renewals, revocations
from tests.support.pki import TRUST_DOMAIN, TestPKI


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def engine(tmp_path: Path, database_url: str) -> Iterator[Engine]:
    """A migrated registry database: SQLite, and PostgreSQL when reachable (conftest)."""
    settings = RegistrySettings(data_dir=tmp_path, registry_database_url=database_url)
    made = make_engine(settings)
    migrate(made)
    yield made
    made.dispose()


def _register(pki: TestPKI, engine: Engine, device_id: str, **kwargs: object) -> IssuedCertificate:
    issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.DEVICE, device_id), **kwargs)  # type: ignore[arg-type]
    parsed = parse_device_certificate(
        issued.certificate_pem.decode(),
        issuing_cert=pki.ca.issuing_cert,
        trust_domain=pki.ca.trust_domain,
    )
    with Session(engine) as session:
        devices.register_devices(session, [devices.Registration(parsed)], audit.Actor("test"))
    return issued


def _csr(device_id: str) -> bytes:
    key = generate_key()
    csr = build_csr(key, Identity.device(TRUST_DOMAIN, device_id))
    return csr.public_bytes(serialization.Encoding.PEM)


def test_renewal_copies_the_lifetime_of_the_current_certificate(
    pki: TestPKI, engine: Engine
) -> None:
    now = dt.datetime.now(dt.UTC)
    old = _register(pki, engine, "dev-life", not_before=now, not_after=now + dt.timedelta(days=40))
    renewed = CertificateRenewer(pki.ca, engine).renew("dev-life", _csr("dev-life"))
    assert renewed.not_after - renewed.not_before == dt.timedelta(days=40)
    assert renewed.serial != format(old.certificate.serial_number, "x")


def test_lifetime_setting_overrides_the_current_certificate(pki: TestPKI, engine: Engine) -> None:
    _register(pki, engine, "dev-life-2")
    renewer = CertificateRenewer(pki.ca, engine, lifetime=dt.timedelta(days=7))
    renewed = renewer.renew("dev-life-2", _csr("dev-life-2"))
    assert renewed.not_after - renewed.not_before == dt.timedelta(days=7)


def test_rate_limit_lifts_after_the_interval(pki: TestPKI, engine: Engine) -> None:
    _register(pki, engine, "dev-rate")
    clock = FakeClock()
    renewer = CertificateRenewer(pki.ca, engine, min_interval_s=60, clock=clock)
    first = renewer.renew("dev-rate", _csr("dev-rate"))
    clock.advance(59)
    with pytest.raises(RenewalRefused, match="retry in 1 s") as refused:
        renewer.renew("dev-rate", _csr("dev-rate"))
    assert refused.value.error == "rate_limited"
    clock.advance(1)
    second = renewer.renew("dev-rate", _csr("dev-rate"))
    assert second.serial != first.serial


def test_oversized_payload_is_refused(pki: TestPKI, engine: Engine) -> None:
    with pytest.raises(RenewalRefused, match="exceeds 16384 bytes") as refused:
        CertificateRenewer(pki.ca, engine).renew("dev-big", b"x" * 20_000)
    assert refused.value.error == "too_large"


def test_decommission_committed_while_signing_wins(
    pki: TestPKI, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(pki, engine, "dev-race")
    renewer = CertificateRenewer(pki.ca, engine)
    issue = pki.ca.issue_client

    def issue_then_decommission(*args: object, **kwargs: object) -> IssuedCertificate:
        issued = issue(*args, **kwargs)  # type: ignore[arg-type]
        with Session(engine) as session:
            revocations.decommission_device(session, "dev-race", "lost", audit.Actor("test"))
        return issued

    monkeypatch.setattr(pki.ca, "issue_client", issue_then_decommission)
    with pytest.raises(RenewalRefused, match="dev-race is decommissioned"):
        renewer.renew("dev-race", _csr("dev-race"))
    with Session(engine) as session:
        certificates = devices.get_device(session, "dev-race").certificates
    assert [c.status for c in certificates] == ["revoked"]  # the new one was never stored


def _service(
    renewer: CertificateRenewer, **kwargs: int
) -> tuple[RenewalService, list[tuple[str, bytes]]]:
    published: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def publish(topic: str, payload: bytes) -> None:
        with lock:
            published.append((topic, payload))

    return RenewalService(renewer, publish, **kwargs), published


def test_service_answers_busy_when_too_many_are_waiting(pki: TestPKI, engine: Engine) -> None:
    service, published = _service(CertificateRenewer(pki.ca, engine), max_pending=0)
    service.submit("devices/dev-busy/cert/renew", _csr("dev-busy"))
    service.close()
    assert [topic for topic, _ in published] == ["devices/dev-busy/cert/issued"]
    assert json.loads(published[0][1])["error"] == "busy"
    assert service.counters["busy"] == 1


def test_service_answers_registry_unavailable_when_the_database_fails(
    pki: TestPKI, tmp_path: Path
) -> None:
    settings = RegistrySettings(
        data_dir=tmp_path,
        registry_database_url=f"sqlite:///{tmp_path / 'missing-dir' / 'registry.db'}",
    )
    broken = make_engine(settings)
    service, published = _service(CertificateRenewer(pki.ca, broken))
    service.submit("devices/dev-db/cert/renew", _csr("dev-db"))
    service.close()
    broken.dispose()
    answer = json.loads(published[0][1])
    assert answer == {
        "error": "registry_unavailable",
        "message": "the registry could not record the certificate; retry later",
    }


def test_service_ignores_a_topic_naming_no_device(pki: TestPKI, engine: Engine) -> None:
    service, published = _service(CertificateRenewer(pki.ca, engine))
    service.submit("devices/+/cert/renew", b"")
    service.close()
    assert published == []
    assert service.counters["bad_topic"] == 1


def test_service_publishes_the_certificate_pem(pki: TestPKI, engine: Engine) -> None:
    _register(pki, engine, "dev-pem")
    service, published = _service(CertificateRenewer(pki.ca, engine))
    service.submit("devices/dev-pem/cert/renew", _csr("dev-pem"))
    service.close()
    assert published[0][0] == "devices/dev-pem/cert/issued"
    assert published[0][1].startswith(b"-----BEGIN CERTIFICATE-----")
    assert service.counters["issued"] == 1


def test_rate_limit_is_shared_by_registry_processes_and_survives_restart(
    pki: TestPKI, engine: Engine
) -> None:
    """Two renewers on one database (two processes, or one restarted): the second sees the
    first's renewal."""
    _register(pki, engine, "dev-shared")
    CertificateRenewer(pki.ca, engine, min_interval_s=60).renew("dev-shared", _csr("dev-shared"))
    with pytest.raises(RenewalRefused, match="at most one renewal per 60 s") as refused:
        CertificateRenewer(pki.ca, engine, min_interval_s=60).renew(
            "dev-shared", _csr("dev-shared")
        )
    assert refused.value.error == "rate_limited"


def test_a_redelivered_csr_gets_the_same_certificate_from_another_process(
    pki: TestPKI, engine: Engine
) -> None:
    _register(pki, engine, "dev-again")
    csr = _csr("dev-again")
    first = CertificateRenewer(pki.ca, engine).renew("dev-again", csr)
    again = CertificateRenewer(pki.ca, engine).renew("dev-again", csr)
    assert (again.serial, again.repeated) == (first.serial, True)


def test_bad_csrs_count_against_the_rate_limit(pki: TestPKI, engine: Engine) -> None:
    _register(pki, engine, "dev-bad")
    clock = FakeClock()
    renewer = CertificateRenewer(pki.ca, engine, min_interval_s=60, max_attempts=3, clock=clock)
    for _ in range(3):
        with pytest.raises(RenewalRefused) as refused:
            renewer.renew("dev-bad", b"not a CSR")
        assert refused.value.error == "invalid_csr"
    with pytest.raises(RenewalRefused, match="at most 3") as refused:
        renewer.renew("dev-bad", _csr("dev-bad"))  # a good one, but the window is used up
    assert refused.value.error == "rate_limited"
    clock.advance(60)
    assert renewer.renew("dev-bad", _csr("dev-bad")).serial


def test_one_devices_flood_does_not_starve_the_others(pki: TestPKI, engine: Engine) -> None:
    """100 requests from one device, then one from another: the other is answered among the
    first few, and the flood beyond the per-device queue is dropped and counted."""
    _register(pki, engine, "dev-fair")
    gate = threading.Event()
    renewer = CertificateRenewer(pki.ca, engine, min_interval_s=0)
    real_renew = renewer.renew

    def slow_renew(device_id: str, payload: bytes) -> object:
        gate.wait(10)  # hold the worker until every request is queued
        return real_renew(device_id, payload)

    renewer.renew = slow_renew  # type: ignore[method-assign, assignment]
    service, published = _service(renewer)
    for _ in range(100):
        service.submit("devices/dev-flood/cert/renew", b"not a CSR")
    service.submit("devices/dev-fair/cert/renew", _csr("dev-fair"))
    gate.set()
    service.close()
    topics = [topic for topic, _ in published]
    assert "devices/dev-fair/cert/issued" in topics[:4], topics[:10]
    assert service.counters["flooded"] >= 90


def test_a_request_claimed_by_one_replica_is_left_to_it(engine: Engine) -> None:
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    csr = _csr("dev-claim")
    with Session(engine) as session:
        assert renewals.claim_request(session, "dev-claim", csr, "a", now)
        assert not renewals.claim_request(session, "dev-claim", csr, "b", now)
        # A re-delivery to the claimant is answered again (the same certificate, by the
        # renewal rule); another CSR of the same device is a new request.
        assert renewals.claim_request(session, "dev-claim", csr, "a", now + dt.timedelta(seconds=1))
        assert renewals.claim_request(session, "dev-claim", _csr("dev-claim"), "b", now)
        # The claimant went away before answering: the claim is taken over once it is old.
        claimed = now + dt.timedelta(seconds=1)
        second = dt.timedelta(seconds=1)
        assert not renewals.claim_request(
            session, "dev-claim", csr, "b", claimed + renewals.CLAIM_TTL - second
        )
        assert renewals.claim_request(
            session, "dev-claim", csr, "b", claimed + renewals.CLAIM_TTL + second
        )
        assert not renewals.claim_request(
            session, "dev-claim", csr, "a", claimed + renewals.CLAIM_TTL + second
        )


def test_the_rate_limit_counts_requests_of_both_replicas_together(
    pki: TestPKI, engine: Engine, tmp_path: Path
) -> None:
    _register(pki, engine, "dev-two")
    second = make_engine(
        RegistrySettings(
            data_dir=tmp_path,
            registry_database_url=engine.url.render_as_string(hide_password=False),
        )
    )
    try:
        replicas = [
            CertificateRenewer(pki.ca, engine, min_interval_s=60, max_attempts=3, instance="a"),
            CertificateRenewer(pki.ca, second, min_interval_s=60, max_attempts=3, instance="b"),
        ]
        errors = []
        for attempt in range(4):
            with pytest.raises(RenewalRefused) as refused:
                replicas[attempt % 2].renew("dev-two", b"not a CSR")
            errors.append(refused.value.error)
        assert errors == ["invalid_csr"] * 3 + ["rate_limited"]
    finally:
        second.dispose()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_burst_of_renewal_requests_passes_the_limit_no_more_than_it_allows(
    pki: TestPKI, engine: Engine, tmp_path: Path, database_url: str, processes: int
) -> None:
    """30 requests of one device released at once (issue 22, item 4), from one registry
    process or split over two (two engines on one database): the attempt is counted under
    the row's lock before any check, so exactly max_attempts get past the limit."""
    _register(pki, engine, "dev-burst")
    engines = [engine]
    if processes == 2:
        settings = RegistrySettings(data_dir=tmp_path, registry_database_url=database_url)
        engines.append(make_engine(settings))
    renewers = [CertificateRenewer(pki.ca, e, min_interval_s=60, max_attempts=5) for e in engines]
    barrier = threading.Barrier(30)
    codes: list[str] = []
    lock = threading.Lock()

    def request(index: int) -> None:
        barrier.wait(timeout=30)
        try:  # a bad CSR: checked only when the request got past the limit
            renewers[index % len(renewers)].renew("dev-burst", b"not a CSR")
            code = "renewed"
        except RenewalRefused as refused:
            code = refused.error.value
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for extra in engines[1:]:
        extra.dispose()
    assert len(codes) == 30
    assert sorted(codes) == sorted(["invalid_csr"] * 5 + ["rate_limited"] * 25), codes
