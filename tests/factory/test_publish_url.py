"""``ca init --publish-url``: every certificate minted afterwards, by any path (provisioning
workers, issue-client, issue-server), names the CRL and the OCSP responder."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

from fleetcore.layout import DataLayout
from tests.factory.conftest import run_ca, run_factory

URL = "http://127.0.0.1:8080/pki"


def crl_urls(path: Path) -> list[str]:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    cdp = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    return [str(name.value) for point in cdp for name in point.full_name or []] + [
        str(description.access_location.value) for description in aia
    ]


def test_every_certificate_after_ca_init_with_publish_url_names_crl_and_ocsp(
    tmp_path: Path,
) -> None:
    layout = DataLayout(tmp_path / "data")
    data = ["--data-dir", str(layout.root)]
    result = run_ca(["init", "--publish-url", f"{URL}/", "--json", *data])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["publish_url"] == URL
    assert run_factory(["provision", "--count", "3", "--workers", "2", *data]).exit_code == 0
    assert run_ca(["issue-client", "--operator", "alice", *data]).exit_code == 0
    server = run_ca(["issue-server", "--name", "edge", "--ip", "127.0.0.1", *data])
    assert server.exit_code == 0, server.output
    expected = [f"{URL}/crl.der", f"{URL}/ocsp"]
    for path in [
        *(layout.device_dir(f"dev-{n:06d}") / "device.crt" for n in range(1, 4)),
        layout.client_cert("alice"),
        layout.server_cert("edge"),
    ]:
        assert crl_urls(path) == expected, path


def test_ca_init_refuses_an_https_publish_url_with_one_line(tmp_path: Path) -> None:
    result = run_ca(["init", "--publish-url", "https://pki.example", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception)
    assert "plain http://" in str(result.exception)
    assert not (tmp_path / "ca").exists()
