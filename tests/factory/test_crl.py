"""factory.crl: base and delta CRLs built in linear time, with what RFC 5280 asks of each."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from factory.ca import CertificateAuthority, RevokedEntry
from factory.crl import SPLICE_FROM, _revoked_certificates, crl_pem
from factory.crl_der import REASON_CODES, entries_der, splice_and_sign
from fleetcore.clock import utcnow
from fleetcore.layout import DataLayout
from fleetcore.profile import new_serial
from tests.conftest import TestPKI


def test_build_crl_lists_every_entry_with_its_date_and_reason(pki: TestPKI) -> None:
    when = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    entries = [
        RevokedEntry(new_serial(), when, x509.ReasonFlags.superseded),
        RevokedEntry(new_serial(), when + dt.timedelta(hours=1), x509.ReasonFlags.key_compromise),
        RevokedEntry(new_serial(), when + dt.timedelta(hours=2)),
    ]
    crl = pki.ca.build_crl(entries, crl_number=7)
    assert crl.is_signature_valid(pki.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    for entry in entries:
        listed = crl.get_revoked_certificate_by_serial_number(entry.serial)
        assert listed is not None
        assert listed.revocation_date_utc == entry.revoked_at
        reason = listed.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is entry.reason
    with pytest.raises(x509.ExtensionNotFound):
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)


def test_a_delta_crl_names_its_base_and_no_freshest_crl(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(DataLayout(tmp_path), "fleet.crl", publish_url="http://h:1")
    base = ca.build_crl([], crl_number=10)
    freshest = base.extensions.get_extension_for_class(x509.FreshestCRL)
    assert not freshest.critical
    assert [n.value for n in freshest.value[0].full_name or []] == ["http://h:1/delta-crl.der"]
    delta = ca.build_crl([RevokedEntry(5, utcnow())], crl_number=11, delta_of=10)
    indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert indicator.critical and indicator.value.crl_number == 10
    with pytest.raises(x509.ExtensionNotFound):
        delta.extensions.get_extension_for_class(x509.FreshestCRL)
    assert (
        delta.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
        == base.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    )


def test_an_ed25519_ca_signs_crls(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(DataLayout(tmp_path), "fleet.ed", key_algorithm="ed25519")
    crl = ca.build_crl([RevokedEntry(3, utcnow())])
    assert crl.is_signature_valid(ca.issuing_cert.public_key())  # type: ignore[arg-type]


@pytest.mark.alone
def test_build_crl_time_is_linear_in_its_entries(pki: TestPKI) -> None:
    """60,000 entries took 3.7 s when entries were added one by one (the builder copies its
    list on every add); linear, they take about 0.4 s here."""
    now = utcnow()
    entries = [RevokedEntry(new_serial(), now) for _ in range(60_000)]
    started = time.process_time()
    crl = pki.ca.build_crl(entries)
    elapsed = time.process_time() - started
    assert len(crl) == 60_000
    assert elapsed < 1.5, f"60,000 entries took {elapsed:.2f} s of CPU"


def _both_ways(
    pki: TestPKI, entries: list[RevokedEntry]
) -> tuple[x509.CertificateRevocationList, x509.CertificateRevocationList]:
    """The same CRL made by the library entry by entry, and with the entries as DER."""
    now = dt.datetime(2026, 5, 4, 3, 2, 1)
    key = pki.ca.issuing_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def signed(revoked: list[x509.RevokedCertificate]) -> x509.CertificateRevocationList:
        return x509.CertificateRevocationListBuilder(
            issuer_name=pki.ca.issuing_cert.subject,
            last_update=now,
            next_update=now + dt.timedelta(days=1),
            extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(9))],
            revoked_certificates=revoked,
        ).sign(key, hashes.SHA256())

    der = entries_der((e.serial, e.revoked_at, e.reason) for e in entries)
    spliced, spliced_der = splice_and_sign(signed([]), der, key)
    # the DER kept is the CRL's own encoding, and its PEM is the library's
    assert spliced_der == spliced.public_bytes(Encoding.DER)
    assert crl_pem(spliced_der) == spliced.public_bytes(Encoding.PEM)
    return signed(_revoked_certificates(entries)), spliced


def test_entries_encoded_here_are_the_bytes_the_library_encodes(pki: TestPKI) -> None:
    # Serials at every length boundary (the INTEGER's sign byte), dates on both sides of
    # 2050 (UTCTime / GeneralizedTime), in UTC and another offset, every reason.
    serials = [
        1,
        0x7F,
        0x80,
        0xFF,
        0x100,
        0x7FFF,
        0x8000,
        2**159 - 1,
        2**64,
        *[new_serial() for _ in range(20)],
    ]
    dates = [
        dt.datetime(2026, 12, 7, 18, 30, 5, 999_999, tzinfo=dt.UTC),
        dt.datetime(1999, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2050, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 6, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    ]
    reasons = list(REASON_CODES)
    entries = [
        RevokedEntry(serial, dates[i % len(dates)], reasons[i % len(reasons)])
        for i, serial in enumerate(serials)
    ]
    library, spliced = _both_ways(pki, entries)
    assert spliced.tbs_certlist_bytes == library.tbs_certlist_bytes
    assert spliced.is_signature_valid(pki.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    empty_library, empty_spliced = _both_ways(pki, [])  # the list absent, not empty
    assert empty_spliced.tbs_certlist_bytes == empty_library.tbs_certlist_bytes


def test_a_large_crl_is_spliced_and_openssl_verifies_it(pki: TestPKI, tmp_path: Path) -> None:
    now = utcnow()
    entries = [RevokedEntry(new_serial(), now) for _ in range(SPLICE_FROM + 5)]
    crl = pki.ca.build_crl(entries, crl_number=12)
    assert len(crl) == len(entries)
    assert crl.is_signature_valid(pki.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 12
    listed = crl.get_revoked_certificate_by_serial_number(entries[-1].serial)
    assert listed is not None and listed.revocation_date_utc == now.replace(microsecond=0)
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (Debian package openssl): the CRL is not checked by it")
    path = tmp_path / "crl.pem"
    path.write_bytes(crl.public_bytes(Encoding.PEM))
    checked = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-noout", "-CAfile", str(pki.layout.chain)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and "verify OK" in checked.stderr + checked.stdout, checked
