"""`certfleet factory sign-csr`: a device's own key signed with the device profile; every bad
CSR refused with a clear message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory.ca import CertificateAuthority
from factory.errors import CSRError
from factory.manifest import Manifest
from fleetcore.errors import CertfleetError
from fleetcore.keys import build_csr, generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import Identity, read_identity, serial_hex
from tests.factory.conftest import TRUST_DOMAIN, run_factory

CsrKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | dsa.DSAPrivateKey


def _csr(
    key: CsrKey,
    *,
    cn: str | None = "dev-csr",
    uris: tuple[str, ...] = (f"spiffe://{TRUST_DOMAIN}/device/dev-csr",),
    dns: tuple[str, ...] = (),
    ca_request: bool = False,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca_request:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _sign(layout: DataLayout, tmp_path: Path, pem: bytes, *extra: str) -> Result:
    path = tmp_path / "device.csr"
    path.write_bytes(pem)
    return run_factory(["sign-csr", str(path), "--data-dir", str(layout.root), *extra])


def test_csr_is_signed_with_the_device_profile_and_recorded(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path
) -> None:
    key = generate_key("p256")
    csr = build_csr(key, Identity.device(TRUST_DOMAIN, "dev-csr"))
    out = tmp_path / "dev-csr.crt"
    result = _sign(
        layout, tmp_path, csr.public_bytes(serialization.Encoding.PEM),
        "--out", str(out), "--hardware-serial", "HW-9", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert cert.public_key() == key.public_key()
    assert read_identity(cert) == Identity.device(TRUST_DOMAIN, "dev-csr")
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert json.loads(result.output)["serial"] == serial_hex(cert.serial_number)
    (record,) = Manifest(layout.manifest).records()
    assert (record.device_id, record.hardware_serial, record.serial) == (
        "dev-csr",
        "HW-9",
        serial_hex(cert.serial_number),
    )


def test_csr_prints_the_certificate_when_no_out_is_given(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path
) -> None:
    result = _sign(layout, tmp_path, _csr(_p256()))
    assert result.exit_code == 0, result.output
    assert x509.load_pem_x509_certificate(result.stdout.encode()).subject.rfc4514_string() == (
        "CN=dev-csr"
    )


def _tampered() -> bytes:
    der = x509.load_pem_x509_csr(_csr(_p256())).public_bytes(serialization.Encoding.DER)
    flipped = der[:-1] + bytes([der[-1] ^ 0x01])  # last byte of the signature's s value
    return x509.load_der_x509_csr(flipped).public_bytes(serialization.Encoding.PEM)


BAD_CSRS: list[tuple[str, Callable[[], bytes], str]] = [
    ("not a csr", lambda: b"hello\n", "not a certificate signing request"),
    ("bad signature", _tampered, "CSR signature does not verify"),
    (
        "weak rsa",
        lambda: _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "RSA key of 1024 bits is too weak",
    ),
    (
        "unsupported curve",
        lambda: _csr(ec.generate_private_key(ec.SECP256K1())),
        "EC curve secp256k1 is not supported",
    ),
    ("dsa", lambda: _csr(dsa.generate_private_key(key_size=1024)), "CSR key is DSA"),
    ("ca request", lambda: _csr(_p256(), ca_request=True), "requests a CA certificate"),
    (
        "foreign trust domain",
        lambda: _csr(_p256(), uris=("spiffe://other.example/device/dev-csr",)),
        "belongs to trust domain 'other.example', not ours",
    ),
    (
        "service identity",
        lambda: _csr(_p256(), cn="dev-csr", uris=(f"spiffe://{TRUST_DOMAIN}/service/dev-csr",)),
        "is a service, not a device",
    ),
    (
        "not spiffe",
        lambda: _csr(_p256(), uris=("https://example.com/dev-csr",)),
        "is not of the form spiffe://",
    ),
    ("cn mismatch", lambda: _csr(_p256(), cn="dev-other"), "CN \\(dev-other\\) does not match"),
    ("no cn", lambda: _csr(_p256(), cn=None), "CN \\(none\\) does not match"),
    ("no san", lambda: _csr(_p256(), uris=()), "CSR has no subjectAltName"),
    (
        "dns only",
        lambda: _csr(_p256(), uris=(), dns=("dev-csr.example",)),
        "CSR carries 0 URI SANs",
    ),
    (
        "two uris",
        lambda: _csr(
            _p256(),
            uris=(
                f"spiffe://{TRUST_DOMAIN}/device/dev-csr",
                f"spiffe://{TRUST_DOMAIN}/device/dev-two",
            ),
        ),
        "CSR carries 2 URI SANs",
    ),
    (
        "extra dns name",
        lambda: _csr(_p256(), dns=("evil.example",)),
        "may hold only the device URI",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), BAD_CSRS, ids=[c[0] for c in BAD_CSRS])
def test_bad_csr_is_refused(
    ca: CertificateAuthority,
    layout: DataLayout,
    tmp_path: Path,
    case: str,
    make: Callable[[], bytes],
    message: str,
) -> None:
    result = _sign(layout, tmp_path, make())
    assert isinstance(result.exception, CSRError), (case, result.output, result.exception)
    with pytest.raises(CSRError, match=message):
        raise result.exception
    assert not layout.manifest.exists(), "a refused CSR must not reach the manifest"


def test_second_csr_for_an_issued_device_is_refused(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path
) -> None:
    assert _sign(layout, tmp_path, _csr(_p256())).exit_code == 0
    result = _sign(layout, tmp_path, _csr(_p256()))
    with pytest.raises(CSRError, match="device dev-csr already has certificate serial"):
        assert isinstance(result.exception, CertfleetError)
        raise result.exception
    assert len(list(Manifest(layout.manifest).records())) == 1


def test_sign_csr_follows_the_validity_policy_and_records_the_device_once(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    import datetime as dt

    from factory.csr_signing import sign_csr
    from fleetcore.profile import CLOCK_SKEW
    from fleetcore.stagger import stagger_fraction_for_id

    lifetime, stagger = dt.timedelta(days=30), dt.timedelta(days=10)
    out = tmp_path / "dev-csr.crt"
    signed = sign_csr(ca, _csr(_p256()), lifetime=lifetime, stagger=stagger, out=out)
    certificate = x509.load_pem_x509_certificate(out.read_bytes())
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    offset = dt.timedelta(seconds=int(stagger_fraction_for_id("dev-csr") * stagger.total_seconds()))
    assert end - start == CLOCK_SKEW + lifetime + offset
    assert signed.record.serial == serial_hex(certificate.serial_number)
    assert [r.device_id for r in Manifest(ca.layout.manifest).records()] == ["dev-csr"]
    with pytest.raises(CSRError, match="already has certificate serial"):
        sign_csr(ca, _csr(_p256()), lifetime=lifetime, stagger=stagger)
