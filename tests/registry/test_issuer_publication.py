"""After an issuing CA rollover (issue 26) the publication listener serves one CRL per
issuing CA (``/crl/<key id>.der``, ``/crls.pem``) and OCSP answers for either, each signed so
that OpenSSL accepts it; registration accepts both issuing CAs' certificates."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
from cryptography import x509

from factory.ca import CertificateAuthority
from factory.issuers import issuer_key_id
from tests.registry.publishing import Published, need_openssl, openssl_ocsp
from tests.support.waits import wait_for


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_openssl(), *args], capture_output=True, text=True, timeout=30)


def _rolled_over(published: Published) -> tuple[Path, str, str]:
    """Roll the CA over; wait for the running registry to follow. (old issuing CA's file,
    old key id, new key id)"""
    old_file = published.layout.root / "old-issuing.crt"
    shutil.copy(published.layout.issuing_cert, old_file)
    old_id = issuer_key_id(published.ca.issuing_cert)
    new_id = published.ca.rollover().key_id
    registry_ca = published.registry.app.state.registry.ca
    assert isinstance(registry_ca, CertificateAuthority)
    assert wait_for(lambda: registry_ca.issuing_cert == published.ca.issuing_cert, 5)
    return old_file, old_id, new_id


def test_each_issuing_ca_has_its_crl_and_openssl_checks_against_it(
    published: Published, tmp_path: Path
) -> None:
    revoked, _ = published.device("dev-old-revoked")
    kept, _ = published.device("dev-old-kept")
    old_file, old_id, new_id = _rolled_over(published)
    fresh, _ = published.device("dev-new")  # registered: the new issuing CA is accepted
    published.decommission("dev-old-revoked")

    old_crl = httpx.get(f"{published.publish_url}/crl/{old_id}.der", timeout=10)
    assert old_crl.status_code == 200
    crl = x509.load_der_x509_crl(old_crl.content)
    old_issuing = x509.load_pem_x509_certificate(old_file.read_bytes())
    assert crl.issuer == old_issuing.subject
    assert crl.is_signature_valid(old_issuing.public_key())  # type: ignore[arg-type]
    new_crl = httpx.get(f"{published.publish_url}/crl/{new_id}.pem", timeout=10)
    assert x509.load_pem_x509_crl(new_crl.content).is_signature_valid(
        published.ca.issuing_cert.public_key()  # type: ignore[arg-type]
    )
    every = httpx.get(f"{published.publish_url}/crls.pem", timeout=10).content
    assert every.count(b"BEGIN X509 CRL") == 2
    missing = httpx.get(f"{published.publish_url}/crl/{'ab' * 20}.der", timeout=10)
    assert missing.status_code == 404

    crls = tmp_path / "crls.pem"
    crls.write_bytes(every)
    trust = published.layout.trust  # both issuing CAs and the root
    for cert, expected in ((revoked, "certificate revoked"), (kept, ": OK"), (fresh, ": OK")):
        result = _openssl(
            "verify", "-crl_check", "-CAfile", str(trust), "-CRLfile", str(crls), str(cert)
        )
        assert expected in result.stdout + result.stderr, result


def test_ocsp_answers_for_both_issuing_cas(published: Published) -> None:
    revoked, _ = published.device("dev-o-revoked")
    kept, _ = published.device("dev-o-kept")
    old_file, _, _ = _rolled_over(published)
    fresh, _ = published.device("dev-o-new")
    published.decommission("dev-o-revoked")
    for cert, issuer, expected in (
        (kept, old_file, "good"),
        (revoked, old_file, "revoked"),
        (fresh, published.layout.issuing_cert, "good"),
    ):
        result = openssl_ocsp(published, cert, issuer=issuer)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "Response verify OK" in output, output
        assert f"{cert}: {expected}" in output, output
