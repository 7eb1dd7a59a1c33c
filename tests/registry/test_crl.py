"""The CRL: signed by the issuing CA, re-signed on every revocation, CRLNumber growing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import httpx
from cryptography import x509

from factory.ca import IssuedCertificate
from registry.server import RegistryServer
from tests.support.pki import TestPKI, pem

Mint = Callable[..., IssuedCertificate]


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_crl_is_signed_by_the_issuing_ca_and_lists_revoked_serials(
    anonymous: httpx.Client,
    operator: httpx.Client,
    mint: Mint,
    pki: TestPKI,
    registry: RegistryServer,
) -> None:
    empty = x509.load_pem_x509_crl(anonymous.get("/crl.pem").content)
    assert empty.is_signature_valid(pki.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert empty.issuer == pki.ca.issuing_cert.subject
    assert len(empty) == 0
    assert empty.next_update_utc is not None
    validity = empty.next_update_utc - empty.last_update_utc
    assert dt.timedelta(hours=23) < validity <= dt.timedelta(hours=24, minutes=2)

    revoked, live = mint("crl-gone"), mint("crl-live")
    for issued in (revoked, live):
        operator.post("/devices", json={"certificate_pem": pem(issued)})
    operator.post("/devices/crl-gone/decommission", json={"reason": "compromised"})

    crl = x509.load_der_x509_crl(anonymous.get("/crl.der").content)
    assert crl.is_signature_valid(pki.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(revoked.certificate.serial_number)
    assert crl.get_revoked_certificate_by_serial_number(live.certificate.serial_number) is None
    assert crl_number(crl) > crl_number(empty)
    resigns = registry.state.metrics.registry.get_sample_value(
        "certfleet_registry_crl_resigns_total"
    )
    # The first base, then the one with the decommission: two; a third when the reader's
    # request lands while the signer is still building from the head before the commit
    # (seen once under a loaded parallel run). Never one per request beyond that.
    assert resigns is not None and 2 <= resigns <= 3, resigns


def test_crl_is_cached_between_revocations(
    anonymous: httpx.Client, registry: RegistryServer
) -> None:
    first = anonymous.get("/crl.pem").content
    assert anonymous.get("/crl.pem").content == first
    assert (
        registry.state.metrics.registry.get_sample_value("certfleet_registry_crl_resigns_total")
        == 1
    )


def test_crl_is_re_signed_when_half_its_validity_has_passed(pki: TestPKI, tmp_path: object) -> None:
    import time

    from registry.crl import CrlCache
    from registry.db import make_engine, migrate
    from registry.settings import RegistrySettings

    engine = make_engine(
        RegistrySettings(
            data_dir=pki.layout.root, registry_database_url=f"sqlite:///{tmp_path}/c.db"
        )
    )
    try:
        migrate(engine)
        cache = CrlCache(pki.ca, engine, next_update=dt.timedelta(seconds=0.4))
        first = cache.current()
        assert cache.current() is first
        deadline = time.monotonic() + 5
        while cache.current() is first and time.monotonic() < deadline:
            time.sleep(0.05)
        second = cache.current()
        assert second.crl_number > first.crl_number
        cache.close()
        assert not cache.signer.alive
    finally:
        engine.dispose()
