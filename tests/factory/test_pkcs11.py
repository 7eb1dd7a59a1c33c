"""CA keys in a PKCS#11 token (SoftHSM2): ``ca init --pkcs11-*`` generates them in the token,
every later command signs with it with no further flags (checked by ``openssl verify``), the
keys cannot be exported, and each misconfiguration is one line and exit 2."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory.ca import CertificateAuthority
from factory.crl import build_crl
from factory.errors import CAError
from factory.issuers import authority_key_id, issuer_key_id
from factory.signer import Pkcs11Uri, TokenKey
from fleetcore.keys import build_csr, generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import Identity, IdentityKind
from tests.factory.conftest import TRUST_DOMAIN, run_certfleet
from tests.softhsm import SoftHsm, make_softhsm


def _openssl_verify(layout: DataLayout, cert: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    result = subprocess.run(
        [
            openssl,
            "verify",
            "-CAfile",
            str(layout.root_cert),
            "-untrusted",
            str(layout.issuing_cert),
            str(cert),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and f"{cert}: OK" in result.stdout, result.stderr


def _init(hsm: SoftHsm, layout: DataLayout) -> subprocess.CompletedProcess[str]:
    return run_certfleet(
        [
            "ca",
            "init",
            "--data-dir",
            str(layout.root),
            "--trust-domain",
            TRUST_DOMAIN,
            "--pkcs11-module",
            hsm.module,
            "--pkcs11-token",
            hsm.label,
            "--pin-file",
            str(hsm.pin_file),
        ],
        env=hsm.env,
    )


@pytest.fixture
def token_ca(softhsm: SoftHsm, tmp_path: Path) -> DataLayout:
    layout = DataLayout(tmp_path / "data")
    result = _init(softhsm, layout)
    assert result.returncode == 0, result.stderr
    return layout


def test_ca_init_generates_the_keys_in_the_token_and_records_them(
    softhsm: SoftHsm, token_ca: DataLayout
) -> None:
    assert not token_ca.root_key.exists() and not token_ca.issuing_key.exists()
    keys = json.loads(token_ca.ca_meta.read_text())["keys"]
    assert keys["store"] == "pkcs11" and keys["module"] == softhsm.module
    assert Pkcs11Uri.parse(keys["issuing"]).token == softhsm.label
    assert keys["pin_file"] == str(softhsm.pin_file.resolve())
    assert "4321" not in token_ca.ca_meta.read_text()  # the PIN itself is never recorded
    _openssl_verify(token_ca, token_ca.issuing_cert)
    root = x509.load_pem_x509_certificate(token_ca.root_cert.read_bytes())
    root.verify_directly_issued_by(root)


def test_the_token_keys_are_sensitive_and_not_extractable(
    softhsm: SoftHsm, token_ca: DataLayout
) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import AttributeSensitive

    session = (
        pkcs11.lib(softhsm.module)
        .get_token(token_label=softhsm.label)
        .open(user_pin=softhsm.pin_file.read_text().strip())
    )
    with session:
        labels = []
        for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            labels.append(key[Attribute.LABEL])
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            with pytest.raises(AttributeSensitive):  # noqa: PT011 (no message to match)
                key[Attribute.VALUE]
    assert sorted(labels) == ["certfleet-issuing", "certfleet-ocsp", "certfleet-root"]
    ca = CertificateAuthority.load(token_ca)
    assert isinstance(ca.issuing_key, TokenKey)
    with pytest.raises(CAError, match="cannot be exported"):
        ca.issuing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def test_provision_mints_with_the_token_with_no_further_flags(
    softhsm: SoftHsm, token_ca: DataLayout
) -> None:
    result = run_certfleet(
        [
            "factory",
            "provision",
            "--count",
            "6",
            "--workers",
            "2",
            "--chunk-size",
            "2",
            "--data-dir",
            str(token_ca.root),
            "--json",
        ],
        env=softhsm.env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["issued"] == 6
    for index in (1, 6):
        _openssl_verify(token_ca, token_ca.device_dir(f"dev-{index:06d}") / "device.crt")


def test_sign_csr_and_client_certificates_are_signed_by_the_token(
    softhsm: SoftHsm, token_ca: DataLayout, tmp_path: Path
) -> None:
    csr = build_csr(generate_key(), Identity.device(TRUST_DOMAIN, "dev-csr"))
    csr_path = tmp_path / "dev.csr"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "dev.crt"
    signed = run_certfleet(
        ["factory", "sign-csr", str(csr_path), "--out", str(out), "--data-dir", str(token_ca.root)],
        env=softhsm.env,
    )
    assert signed.returncode == 0, signed.stderr
    _openssl_verify(token_ca, out)
    client = run_certfleet(
        ["ca", "issue-client", "--operator", "olga", "--data-dir", str(token_ca.root)],
        env=softhsm.env,
    )
    assert client.returncode == 0, client.stderr
    _openssl_verify(token_ca, token_ca.client_cert("olga"))


def _one_line_refusal(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "4321" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"CERTFLEET_CA_ISSUING_KEY": "pkcs11:token=certfleet-test"}, "names no object="),
        ({"CERTFLEET_CA_ISSUING_KEY": "pkcs11:token=x;objekt=y"}, "'objekt' is not an attribute"),
        ({"CERTFLEET_CA_ISSUING_KEY": "pkcs11:token=t;object=o?pin-value=1"}, "carries a PIN"),
        ({"CERTFLEET_CA_PIN": "0000"}, "wrong PIN for PKCS#11 token 'certfleet-test'"),
        (
            {"CERTFLEET_CA_ISSUING_KEY": "pkcs11:token=absent;object=certfleet-issuing"},
            "no PKCS#11 token labelled 'absent'",
        ),
        (
            {"CERTFLEET_CA_ISSUING_KEY": "pkcs11:token=certfleet-test;object=absent"},
            "holds no key labelled 'absent'",
        ),
        (
            {"CERTFLEET_CA_ISSUING_KEY": "pkcs11:token=certfleet-test;object=certfleet-ocsp"},
            "does not belong to the CA certificate",
        ),
        ({"CERTFLEET_CA_PKCS11_MODULE": "/nonexistent/libnone.so"}, None),
    ],
)
def test_each_misconfiguration_is_one_line_and_exit_2(
    softhsm: SoftHsm, token_ca: DataLayout, variables: dict[str, str], words: str | None
) -> None:
    env = {**softhsm.env, **variables}
    if words is None:  # the module setting only counts for a URI without module-path
        issuing = Pkcs11Uri.parse(json.loads(token_ca.ca_meta.read_text())["keys"]["issuing"])
        env["CERTFLEET_CA_ISSUING_KEY"] = f"pkcs11:token={issuing.token};object={issuing.object}"
        words = "PKCS#11 module /nonexistent/libnone.so cannot be loaded"
    result = run_certfleet(
        ["ca", "issue-client", "--operator", "olga", "--data-dir", str(token_ca.root)], env=env
    )
    _one_line_refusal(result, words)
    assert not token_ca.client_cert("olga").exists()


def test_a_pin_file_readable_by_others_is_refused(
    softhsm: SoftHsm, token_ca: DataLayout, tmp_path: Path
) -> None:
    loose = tmp_path / "loose-pin"
    loose.write_text(softhsm.pin_file.read_text())
    loose.chmod(0o644)
    result = run_certfleet(
        ["ca", "issue-client", "--operator", "olga", "--data-dir", str(token_ca.root)],
        env={**softhsm.env, "CERTFLEET_CA_PIN_FILE": str(loose)},
    )
    _one_line_refusal(result, "is readable by other users")


def test_ca_init_refuses_a_missing_token_and_a_token_already_used(
    softhsm: SoftHsm, token_ca: DataLayout, tmp_path: Path
) -> None:
    again = _init(softhsm, DataLayout(tmp_path / "second"))
    _one_line_refusal(again, "already holds 'certfleet-root'")
    other = make_softhsm(tmp_path / "other-hsm", label="elsewhere")
    missing = _init(
        SoftHsm(softhsm.conf, softhsm.module, "no-such-token", other.pin_file),
        DataLayout(tmp_path / "third"),
    )
    _one_line_refusal(missing, "no PKCS#11 token labelled 'no-such-token'")
    assert not DataLayout(tmp_path / "third").root_cert.exists()


def test_a_process_signs_through_a_session_copy_as_guarded_as_the_token_key(
    softhsm: SoftHsm, token_ca: DataLayout
) -> None:
    """Issue 26: the token object is copied once per process into a session object (SoftHSM2
    re-reads a token object's files at every signature); the copy stays in the token,
    sensitive and never extractable, and signs for the issuing certificate."""
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    ca = CertificateAuthority.load(token_ca)
    key = ca.issuing_key
    assert isinstance(key, TokenKey)
    signing = key._handle
    assert signing[Attribute.TOKEN] is False  # a session object, not the token object
    assert signing[Attribute.SENSITIVE] is True
    assert signing[Attribute.EXTRACTABLE] is False
    with pytest.raises(AttributeSensitive):  # noqa: PT011 (no message to match)
        signing[Attribute.VALUE]
    issued = ca.issue_client(ca.identity(IdentityKind.DEVICE, "dev-copy"))
    issued.certificate.verify_directly_issued_by(ca.issuing_cert)


def test_rollover_generates_the_new_issuing_key_in_the_token(
    softhsm: SoftHsm, token_ca: DataLayout
) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    old_id = issuer_key_id(x509.load_pem_x509_certificate(token_ca.issuing_cert.read_bytes()))
    result = run_certfleet(
        ["ca", "rollover", "--data-dir", str(token_ca.root), "--json"], env=softhsm.env
    )
    assert result.returncode == 0, result.stderr
    new_id = json.loads(result.stdout)["key_id"]
    assert new_id != old_id
    # Recorded like ca init records keys: the new URI, the old one under its key id.
    keys = json.loads(token_ca.ca_meta.read_text())["keys"]
    assert Pkcs11Uri.parse(keys["issuing"]).object == "certfleet-issuing-2"
    assert Pkcs11Uri.parse(keys["previous_issuing"][old_id]).object == "certfleet-issuing"
    assert "4321" not in token_ca.ca_meta.read_text()
    assert not token_ca.issuing_key.exists()
    assert not list(token_ca.issuers_dir.glob("*.key"))  # no key file, old or new
    _openssl_verify(token_ca, token_ca.issuing_cert)  # signed by the token's root key

    session = (
        pkcs11.lib(softhsm.module)
        .get_token(token_label=softhsm.label)
        .open(user_pin=softhsm.pin_file.read_text().strip())
    )
    with session:
        (new_key,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: "certfleet-issuing-2"}
        )
        assert new_key[Attribute.EXTRACTABLE] is False
        assert new_key[Attribute.SENSITIVE] is True
        assert new_key[Attribute.NEVER_EXTRACTABLE] is True

    # Every later command signs with the new token key, no further flags.
    client = run_certfleet(
        ["ca", "issue-client", "--operator", "nora", "--data-dir", str(token_ca.root)],
        env=softhsm.env,
    )
    assert client.returncode == 0, client.stderr
    _openssl_verify(token_ca, token_ca.client_cert("nora"))
    nora = x509.load_pem_x509_certificate(token_ca.client_cert("nora").read_bytes())
    assert authority_key_id(nora) == new_id
    # Both issuing CAs load with their token keys (the old one signs its CRL and OCSP on).
    ca = CertificateAuthority.load(token_ca)
    assert [issuer.key_id for issuer in ca.issuers] == [new_id, old_id]
    for issuer in ca.issuers:
        assert isinstance(issuer.key, TokenKey)
        crl = build_crl(
            issuer.certificate, issuer.key, [], next_update=dt.timedelta(hours=1), crl_number=1
        )
        assert crl.is_signature_valid(issuer.certificate.public_key())  # type: ignore[arg-type]
    # A second rollover takes the next label; the first issuing CA stays recorded.
    again = run_certfleet(["ca", "rollover", "--data-dir", str(token_ca.root)], env=softhsm.env)
    assert again.returncode == 0, again.stderr
    keys = json.loads(token_ca.ca_meta.read_text())["keys"]
    assert Pkcs11Uri.parse(keys["issuing"]).object == "certfleet-issuing-3"
    assert set(keys["previous_issuing"]) == {old_id, new_id}
    assert len(CertificateAuthority.load(token_ca).issuers) == 3
