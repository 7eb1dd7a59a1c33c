"""Delta CRLs (RFC 5280 5.2.4) on the publication listener: what the delta lists, how it
chains to its base, Freshest CRL in the base and in certificates, ``openssl verify
-crl_check -use_deltas`` over the files served, expired entries leaving both, and CRL
numbers growing across a restart. On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from sqlalchemy import text

from fleetcore.clock import utcnow
from fleetcore.profile import CLOCK_SKEW
from tests.registry.publishing import Published, publishing_registry, serve_published

#: Per-change size 0: the base is never re-signed by a change, only on its schedule, so
#: every change lands in the delta (a fleet whose base is past per-change size).
DELTA_ONLY = {"registry_crl_per_change_entries": 0}


@pytest.fixture
def delta_registry(tmp_path: Path, database_url: str) -> Iterator[Published]:
    with publishing_registry(tmp_path, database_url=database_url, **DELTA_ONLY) as published:
        yield published


def fetch(published: Published, path: str) -> x509.CertificateRevocationList:
    response = httpx.get(f"{published.publish_url}{path}", timeout=30)
    assert response.status_code == 200, response.text
    if path.endswith(".pem"):
        return x509.load_pem_x509_crl(response.content)
    assert response.headers["content-type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(response.content)


def number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def listed(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def test_delta_lists_what_was_revoked_since_its_base_and_names_it(
    delta_registry: Published,
) -> None:
    published = delta_registry
    early, _ = published.device("dev-early")
    late, _ = published.device("dev-late")
    live, _ = published.device("dev-live")
    published.decommission("dev-early")
    base = fetch(published, "/crl.der")
    assert listed(base) == {serial_of(early)}

    published.decommission("dev-late", reason_code="keyCompromise")
    assert number(fetch(published, "/crl.der")) == number(base)  # the base is not re-signed
    delta = fetch(published, "/delta-crl.der")
    assert listed(delta) == {serial_of(late)}
    entry = delta.get_revoked_certificate_by_serial_number(serial_of(late))
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value
    assert reason.reason is x509.ReasonFlags.key_compromise
    indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert indicator.critical and indicator.value.crl_number == number(base)
    assert number(delta) > number(base)
    issuing_key = published.ca.issuing_cert.public_key()
    assert delta.is_signature_valid(issuing_key)  # type: ignore[arg-type]
    # The same scope as its base (OpenSSL pairs them by issuer, AKI and IDP).
    assert delta.issuer == base.issuer
    for kind in (x509.IssuingDistributionPoint, x509.AuthorityKeyIdentifier):
        assert (
            delta.extensions.get_extension_for_class(kind).value
            == base.extensions.get_extension_for_class(kind).value
        )
    with pytest.raises(x509.ExtensionNotFound):
        delta.extensions.get_extension_for_class(x509.FreshestCRL)  # never in a delta
    assert serial_of(live) not in listed(delta) | listed(base)

    # The next change re-signs the delta with a higher number, against the same base.
    published.decommission("dev-live")
    second = fetch(published, "/delta-crl.pem")
    assert listed(second) == {serial_of(late), serial_of(live)}
    assert number(second) > number(delta)
    assert second.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == (
        number(base)
    )


def test_base_and_certificates_name_the_delta_in_freshest_crl(delta_registry: Published) -> None:
    published = delta_registry
    cert, _ = published.device("dev-fresh")
    delta_url = f"{published.publish_url}/delta-crl.der"
    for extensions in (
        x509.load_pem_x509_certificate(cert.read_bytes()).extensions,
        fetch(published, "/crl.der").extensions,
    ):
        freshest = extensions.get_extension_for_class(x509.FreshestCRL)
        assert not freshest.critical
        assert [name.value for name in freshest.value[0].full_name or []] == [delta_url]


def openssl_verify(published: Published, cert: Path, crls: list[Path], deltas: bool) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    command = [openssl, "verify", "-crl_check", *(["-use_deltas"] if deltas else [])]
    command += ["-CAfile", str(published.layout.root_cert)]
    command += ["-untrusted", str(published.layout.issuing_cert)]
    for crl in crls:
        command += ["-CRLfile", str(crl)]
    result = subprocess.run([*command, str(cert)], capture_output=True, text=True, timeout=30)
    return f"rc={result.returncode} {result.stdout}{result.stderr}"


def test_openssl_use_deltas_rejects_a_certificate_revoked_only_in_the_delta(
    delta_registry: Published, tmp_path: Path
) -> None:
    published = delta_registry
    good, _ = published.device("dev-good")
    gone, _ = published.device("dev-gone")
    base_file, delta_file = tmp_path / "base.pem", tmp_path / "delta.pem"
    base_file.write_bytes(httpx.get(f"{published.publish_url}/crl.pem", timeout=30).content)
    published.decommission("dev-gone")
    delta_file.write_bytes(httpx.get(f"{published.publish_url}/delta-crl.pem", timeout=30).content)
    assert serial_of(gone) not in listed(x509.load_pem_x509_crl(base_file.read_bytes()))

    both = [base_file, delta_file]
    assert openssl_verify(published, good, both, deltas=True).startswith("rc=0")
    refused = openssl_verify(published, gone, both, deltas=True)
    assert not refused.startswith("rc=0") and "certificate revoked" in refused, refused
    # Without the delta (or without -use_deltas) the base alone does not know yet.
    assert openssl_verify(published, gone, [base_file], deltas=True).startswith("rc=0")
    assert openssl_verify(published, gone, both, deltas=False).startswith("rc=0")


def expire(published: Published, device_id: str) -> None:
    """Move a certificate's not_after into the past, as time would (the registry reads it
    from the row; the relying party would see an expired certificate)."""
    past = utcnow() - CLOCK_SKEW - dt.timedelta(minutes=1)
    with published.registry.state.engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            past = past.replace(tzinfo=None)
        connection.execute(
            text("UPDATE certificate SET not_after = :past WHERE device_id = :device_id"),
            {"past": past, "device_id": device_id},
        )


def test_expired_entries_leave_the_delta_and_the_next_base(
    tmp_path: Path, database_url: str
) -> None:
    with publishing_registry(
        tmp_path, database_url=database_url, registry_crl_base_interval_s=1.0, **DELTA_ONLY
    ) as published:
        kept, _ = published.device("dev-kept")
        gone, _ = published.device("dev-expiring")
        fetch(published, "/crl.der")
        published.decommission("dev-kept")
        published.decommission("dev-expiring")
        assert listed(fetch(published, "/delta-crl.der")) == {serial_of(kept), serial_of(gone)}
        expire(published, "dev-expiring")
        published.device("dev-other")
        published.decommission("dev-other")
        assert serial_of(gone) not in listed(fetch(published, "/delta-crl.der"))
        base = fetch(published, "/crl.der")
        deadline = utcnow() + dt.timedelta(seconds=10)
        while serial_of(kept) not in listed(base):  # the scheduled base (1 s) takes them in
            assert utcnow() < deadline, "no scheduled base re-sign within 10 s"
            time.sleep(0.1)
            base = fetch(published, "/crl.der")
        assert serial_of(gone) not in listed(base)
        delta = fetch(published, "/delta-crl.der")
        assert number(delta) > number(base)
        assert listed(delta) == set()  # nothing since the new base


def test_crl_numbers_grow_across_a_restart(tmp_path: Path, database_url: str) -> None:
    with publishing_registry(tmp_path, database_url=database_url, **DELTA_ONLY) as published:
        published.device("dev-restart")
        before = [number(fetch(published, path)) for path in ("/crl.der", "/delta-crl.der")]
        published.decommission("dev-restart")
        before.append(number(fetch(published, "/delta-crl.der")))
        ca, port = published.ca, int(published.publish_url.rsplit(":", 1)[1])
    with serve_published(ca, port, database_url=database_url, **DELTA_ONLY) as restarted:
        base = fetch(restarted, "/crl.der")
        delta = fetch(restarted, "/delta-crl.der")
    assert number(base) > max(before)
    assert number(delta) > number(base)
    assert delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == (
        number(base)
    )
