"""`certfleet factory claim create`: the claim certificate, its key (0600), its allow-list,
recorded in a real registry over REST; and the refusals of its input."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from factory.ca import CertificateAuthority
from factory.claims import AllowEntry, read_allow_file
from factory.errors import ProvisionError
from factory.registration import tls_context
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, read_identity
from tests.factory.conftest import run_factory


def test_claim_create_mints_the_claim_and_records_it_in_the_registry(
    layout: DataLayout, registry_url: str, tmp_path: Path
) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("# line 7, week 49\ndev-a1\ndev-a2,SN-0002\n,SN-0003\n")
    args = [
        "claim", "create", "--batch", "line7-w49", "--quota", "3", "--expires", "30d",
        "--allow-file", str(allow), "--registry", registry_url,
        "--data-dir", str(layout.root), "--json",
    ]  # fmt: skip
    result = run_factory(args, env={"CERTFLEET_REGISTRY_TOKEN": ""})
    assert result.exit_code == 0, (result.output, result.exception)
    body = json.loads(result.output)
    assert body["registered"] is True and body["allow"] == 3
    key = Path(body["key"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(Path(body["cert"]).read_bytes())
    identity = read_identity(certificate)
    assert (identity.kind, identity.name) == (IdentityKind.CLAIM, "line7-w49")

    context = tls_context(layout.root_cert, (layout.client_cert("ops"), layout.client_key("ops")))
    with httpx.Client(verify=context) as operator:
        claim = operator.get(f"{registry_url}/api/v1/claims/line7-w49").json()
    assert claim["serial"] == body["serial"]
    assert (claim["quota"], claim["enrolled"], claim["allow_count"]) == (3, 0, 3)

    again = run_factory(args, env={"CERTFLEET_REGISTRY_TOKEN": ""})
    assert again.exit_code != 0
    assert "already exists" in str(again.exception)


def test_allow_file_lines_become_entries_and_bad_lines_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text('dev-1\ndev-2,SN-2\n,SN3\n{"device_id": "dev-4", "hardware_serial": "X4"}\n')
    assert read_allow_file(good) == [
        AllowEntry("dev-1"),
        AllowEntry("dev-2", "SN-2"),
        AllowEntry("SN3", "SN3"),
        AllowEntry("dev-4", "X4"),
    ]
    for text, words in (
        ("dev-1\ndev-1\n", "listed twice"),
        ("bad id!\n", "bad.txt:1"),
        (",SN with space\n", "printable"),
        (",SN/1\n", "bind the serial to a device id"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ProvisionError, match=words):
            read_allow_file(bad)


def test_claim_create_records_the_claims_own_webhook(layout: DataLayout, registry_url: str) -> None:
    url = "https://approvals.example/est-check?token=abc"
    args = [
        "claim", "create", "--batch", "line8-w49", "--quota", "2", "--expires", "1d",
        "--webhook", url, "--registry", registry_url, "--data-dir", str(layout.root), "--json",
    ]  # fmt: skip
    result = run_factory(args, env={"CERTFLEET_REGISTRY_TOKEN": ""})
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.output)["webhook"] is True
    context = tls_context(layout.root_cert, (layout.client_cert("ops"), layout.client_key("ops")))
    with httpx.Client(verify=context) as operator:
        claim = operator.get(f"{registry_url}/api/v1/claims/line8-w49").json()
    assert claim["webhook_url"] == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://approvals.example/check", "plain http to approvals.example: use https"),
        ("https://user:pw@approvals.example/check", "user name or password"),
        ("ftp://approvals.example/check", "is not https://host"),
        ("https://approvals.example/check#x", "#fragment"),
    ],
)
def test_claim_create_refuses_a_webhook_url_before_minting(
    ca: CertificateAuthority, layout: DataLayout, url: str, words: str
) -> None:
    args = [
        "claim", "create", "--batch", "line9-w49", "--quota", "2", "--expires", "1d",
        "--webhook", url, "--data-dir", str(layout.root),
    ]  # fmt: skip
    result = run_factory(args, env={"CERTFLEET_REGISTRY_TOKEN": ""})
    assert result.exit_code != 0
    assert "--webhook" in str(result.exception) and words in str(result.exception)
    assert not (layout.root / "claims" / "line9-w49").exists()
