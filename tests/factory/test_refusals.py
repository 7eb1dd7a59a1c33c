"""Every refusal of the CA and provisioning commands, through the CLI, message matched."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509

from factory.ca import CertificateAuthority
from factory.errors import CAError, ProvisionError
from fleetcore.errors import CertfleetError, ConfigError
from fleetcore.layout import DataLayout
from tests.factory.conftest import TRUST_DOMAIN, run_ca, run_factory


def _raise(result: Result) -> None:
    """Re-raise the CertfleetError a command ended with (fails if it succeeded)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, CertfleetError), repr(result.exception)
    raise result.exception


# -- ca init -------------------------------------------------------------------------------


def test_ca_init_writes_keys_0600_and_refuses_to_overwrite(layout: DataLayout) -> None:
    args = ["init", "--trust-domain", TRUST_DOMAIN, "--data-dir", str(layout.root)]
    assert run_ca(args).exit_code == 0
    for key in (layout.root_key, layout.issuing_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    root_before = layout.root_cert.read_bytes()
    with pytest.raises(CAError, match="a CA already exists in .*nothing was overwritten"):
        _raise(run_ca(args))
    assert layout.root_cert.read_bytes() == root_before


def test_ca_init_refuses_an_unknown_key_algorithm_naming_the_choices(layout: DataLayout) -> None:
    args = ["init", "--trust-domain", TRUST_DOMAIN, "--data-dir", str(layout.root)]
    with pytest.raises(
        ConfigError, match="--key-algorithm 'p521' is not one of p256, p384, ed25519, rsa2048"
    ):
        _raise(run_ca([*args, "--key-algorithm", "p521"]))
    assert not layout.root_cert.exists()


def test_ca_init_refuses_an_invalid_trust_domain(layout: DataLayout) -> None:
    with pytest.raises(CertfleetError, match="trust domain 'Fleet_Local' is not a lower-case"):
        _raise(run_ca(["init", "--trust-domain", "Fleet_Local", "--data-dir", str(layout.root)]))


def test_wrong_passphrase_is_refused(layout: DataLayout) -> None:
    args = ["init", "--trust-domain", TRUST_DOMAIN, "--data-dir", str(layout.root)]
    assert run_ca(args, env={"CERTFLEET_CA_PASSPHRASE": "correct horse"}).exit_code == 0
    assert b"ENCRYPTED" in layout.issuing_key.read_bytes()
    provision = ["provision", "--count", "1", "--data-dir", str(layout.root)]
    with pytest.raises(CAError, match="wrong passphrase for key file .*issuing.key"):
        _raise(run_factory(provision, env={"CERTFLEET_CA_PASSPHRASE": "battery staple"}))
    with pytest.raises(CAError, match="is encrypted: give its passphrase with --passphrase-file"):
        _raise(run_factory(provision, env={"CERTFLEET_CA_PASSPHRASE": ""}))
    ok = run_factory(provision, env={"CERTFLEET_CA_PASSPHRASE": "correct horse"})
    assert ok.exit_code == 0, ok.output


def test_unreadable_ca_key_is_refused(ca: CertificateAuthority, layout: DataLayout) -> None:
    provision = ["provision", "--count", "1", "--data-dir", str(layout.root)]
    layout.issuing_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(CAError, match="issuing.key is not a readable PEM private key"):
        _raise(run_factory(provision))
    layout.issuing_key.unlink()
    layout.issuing_key.mkdir()  # unreadable even for root
    with pytest.raises(CAError, match="issuing.key cannot be read"):
        _raise(run_factory(provision))


def test_provision_without_a_ca_says_to_run_ca_init(layout: DataLayout) -> None:
    with pytest.raises(CAError, match="no CA in .*run 'certfleet ca init' first"):
        _raise(run_factory(["provision", "--count", "1", "--data-dir", str(layout.root)]))


# -- issue-server / issue-client -----------------------------------------------------------


def test_issue_server_writes_leaf_plus_issuing_and_key_0600(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    result = run_ca(
        ["issue-server", "--name", "broker", "--dns", "localhost", "--ip", "127.0.0.1",
         "--data-dir", str(layout.root)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    certs = x509.load_pem_x509_certificates(layout.server_cert("broker").read_bytes())
    assert [c.subject for c in certs] == [certs[0].subject, ca.issuing_cert.subject]
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE(layout.server_key("broker").stat().st_mode) == 0o600


def test_issue_server_needs_a_dns_name_or_ip(ca: CertificateAuthority, layout: DataLayout) -> None:
    with pytest.raises(CertfleetError, match="needs at least one --dns or --ip"):
        _raise(run_ca(["issue-server", "--name", "broker", "--data-dir", str(layout.root)]))


def test_issue_client_writes_leaf_only_and_refuses_to_overwrite(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    args = ["issue-client", "--service", "factory", "--data-dir", str(layout.root)]
    assert run_ca(args).exit_code == 0
    certs = x509.load_pem_x509_certificates(layout.client_cert("factory").read_bytes())
    assert len(certs) == 1
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/service/factory"
    ]
    assert stat.S_IMODE(layout.client_key("factory").stat().st_mode) == 0o600
    with pytest.raises(CAError, match="factory.crt already exists; pass --force"):
        _raise(run_ca(args))
    assert run_ca([*args, "--force"]).exit_code == 0


def test_issue_client_needs_exactly_one_of_operator_or_service(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    with pytest.raises(ConfigError, match="exactly one of --operator NAME or --service NAME"):
        _raise(run_ca(["issue-client", "--data-dir", str(layout.root)]))
    with pytest.raises(ConfigError, match="exactly one of --operator NAME or --service NAME"):
        _raise(
            run_ca(
                [
                    "issue-client",
                    "--operator",
                    "a",
                    "--service",
                    "b",
                    "--data-dir",
                    str(layout.root),
                ]
            )  # fmt: skip
        )


# -- provision input -----------------------------------------------------------------------


@pytest.mark.parametrize("count", ["0", "-3"])
def test_count_zero_or_negative_is_refused(
    ca: CertificateAuthority, layout: DataLayout, count: str
) -> None:
    with pytest.raises(ProvisionError, match=f"--count must be at least 1 \\(got {count}\\)"):
        _raise(run_factory(["provision", "--count", count, "--data-dir", str(layout.root)]))
    assert not layout.manifest.exists()


def test_count_and_serials_together_are_refused(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    with pytest.raises(ProvisionError, match="exactly one of --count N or --serials"):
        _raise(
            run_factory(
                ["provision", "--count", "1", "--serials", "x.csv", "--data-dir", str(layout.root)]
            )
        )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lifetime", "1year", "--lifetime '1year' is not a duration"),
        ("--lifetime", "0d", "--lifetime must be longer than zero"),
        ("--stagger", "-5d", "--stagger '-5d' is not a duration"),
    ],
)
def test_bad_durations_are_refused(
    ca: CertificateAuthority, layout: DataLayout, flag: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _raise(
            run_factory(["provision", "--count", "1", flag, value, "--data-dir", str(layout.root)])
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty: expected a 'hardware_serial' header"),
        ("hardware_serial\n", "has a header but no device rows"),
        ("serial,model\nA1,x\n", "line 1: the header needs a 'hardware_serial' column"),
        ("hardware_serial,model\nA1,x\nA2\n", "line 3: expected 2 fields like the header, found 1"),
        ('hardware_serial\n"A1\n', "line 2: malformed CSV"),
        ("hardware_serial\nA1\nbad serial!\n", "line 3: hardware serial 'bad serial!' is empty or"),
        ("hardware_serial,model\nA1,x\n,y\n", "line 3: hardware serial '' is empty"),
        (
            "hardware_serial\nA1\nA2\nA1\n",
            "line 4: duplicate hardware serial 'A1' \\(first on line 2",
        ),
        (
            "hardware_serial,device_id\nA1,d-1\nA2,d-1\n",
            "line 3: duplicate device id 'd-1' \\(first on line 2\\)",
        ),
        ("hardware_serial,device_id\nA1,d/1\n", "line 2: device id 'd/1' is not valid"),
    ],
)
def test_bad_serials_csv_is_refused_naming_the_line(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path, content: str, message: str
) -> None:
    csv_file = tmp_path / "serials.csv"
    csv_file.write_text(content)
    with pytest.raises(ProvisionError, match=message):
        _raise(
            run_factory(["provision", "--serials", str(csv_file), "--data-dir", str(layout.root)])
        )
    assert not layout.manifest.exists()


def test_missing_serials_file_is_refused(ca: CertificateAuthority, layout: DataLayout) -> None:
    with pytest.raises(ProvisionError, match="serials file .*nope.csv does not exist"):
        _raise(run_factory(["provision", "--serials", "nope.csv", "--data-dir", str(layout.root)]))


def test_invalid_prefix_is_refused(ca: CertificateAuthority, layout: DataLayout) -> None:
    with pytest.raises(ProvisionError, match="device id prefix 'bad prefix' is not valid"):
        _raise(
            run_factory(
                [
                    "provision",
                    "--count",
                    "2",
                    "--prefix",
                    "bad prefix",
                    "--data-dir",
                    str(layout.root),
                ]
            )  # fmt: skip
        )


def test_second_concurrent_run_is_refused(ca: CertificateAuthority, layout: DataLayout) -> None:
    from factory.provision import ProvisionLock

    with (
        ProvisionLock(layout.provision_lock),
        pytest.raises(ProvisionError, match="another provisioning run is using"),
    ):
        _raise(run_factory(["provision", "--count", "1", "--data-dir", str(layout.root)]))
