"""The publication listener: CRL and OCSP over plain HTTP for relying parties not ours,
checked against real peers (``openssl ocsp``, ``openssl verify -crl_download``) and our own
parsing of the answers (nonce, GET form, refusals, the responder certificate)."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from sqlalchemy.pool import QueuePool

from factory.ca import CertificateAuthority, write_issued
from fleetcore.errors import ConfigError
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.ocsp import RESPONDER_NAME, OcspResponder
from registry.publication import MAX_OCSP_REQUEST
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.registry.publishing import Published, need_openssl, openssl_ocsp
from tests.support.ports import free_port

TRUST_DOMAIN = "fleet.pub"


def ocsp_output(published: Published, cert: Path) -> str:
    """What ``openssl ocsp`` says of ``cert`` (it must succeed)."""
    result = openssl_ocsp(published, cert)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


# -- what the certificates and the CRL carry ----------------------------------------------------


def test_certificates_name_the_crl_and_the_ocsp_responder(published: Published) -> None:
    cert_path, _ = published.device("dev-urls", register=False)
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cdp = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [name.value for name in cdp[0].full_name or []] == [f"{published.publish_url}/crl.der"]
    aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (AuthorityInformationAccessOID.OCSP, f"{published.publish_url}/ocsp")
    ]
    server = published.ca.issue_server("edge", dns_names=["localhost"], ip_addresses=[])
    assert server.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)


def test_crl_carries_the_issuing_distribution_point(published: Published) -> None:
    for path in ("/crl.der", "/crl.pem"):
        response = httpx.get(f"{published.publish_url}{path}", timeout=10)
        assert response.status_code == 200
        crl = (
            x509.load_der_x509_crl(response.content)
            if path.endswith("der")
            else x509.load_pem_x509_crl(response.content)
        )
        assert crl.is_signature_valid(published.ca.issuing_cert.public_key())  # type: ignore[arg-type]
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert idp.critical
        assert [name.value for name in idp.value.full_name or []] == [
            f"{published.publish_url}/crl.der"
        ]


def test_a_ca_without_publish_url_mints_certificates_without_them(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(DataLayout(tmp_path), TRUST_DOMAIN)
    issued = ca.issue_client(ca.identity(IdentityKind.DEVICE, "dev-plain"))
    with pytest.raises(x509.ExtensionNotFound):
        issued.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    crl = ca.build_crl([])
    with pytest.raises(x509.ExtensionNotFound):
        crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)


@pytest.mark.parametrize(
    "url",
    ["https://127.0.0.1:8080", "ftp://host/crl", "http://", "http://h:99999", "http://h/?q=1"],
)
def test_ca_init_refuses_a_publish_url_that_is_not_plain_http(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="publish-url"):
        CertificateAuthority.init(DataLayout(tmp_path), TRUST_DOMAIN, publish_url=url)
    assert not DataLayout(tmp_path).root_cert.exists()


def test_publish_url_survives_loading_the_ca(published: Published) -> None:
    loaded = CertificateAuthority.load(published.layout)
    assert loaded.publish_url == published.publish_url


# -- OCSP against openssl ------------------------------------------------------------------


def test_openssl_ocsp_says_good_then_revoked_after_decommission(published: Published) -> None:
    cert, _ = published.device("dev-ocsp")
    before = ocsp_output(published, cert)
    assert "Response verify OK" in before
    assert f"{cert}: good" in before
    assert "nonce" not in before.lower()  # openssl warns when a nonce is missing or wrong

    published.decommission("dev-ocsp", reason_code="keyCompromise")
    after = ocsp_output(published, cert)
    assert "Response verify OK" in after
    assert f"{cert}: revoked" in after
    assert "Revocation Time:" in after
    assert "Reason: keyCompromise" in after


def test_openssl_ocsp_says_unknown_for_a_certificate_never_registered(
    published: Published,
) -> None:
    cert, _ = published.device("dev-unregistered", register=False)
    output = ocsp_output(published, cert)
    assert "Response verify OK" in output
    assert f"{cert}: unknown" in output


def test_openssl_verify_downloads_the_crl_from_the_distribution_point(
    published: Published,
) -> None:
    openssl = need_openssl()
    cert, _ = published.device("dev-crl")

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                openssl,
                "verify",
                "-crl_check",
                "-crl_download",
                "-CAfile",
                str(published.layout.root_cert),
                "-untrusted",
                str(published.layout.issuing_cert),
                str(cert),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    good = verify()
    assert good.returncode == 0 and f"{cert}: OK" in good.stdout, good.stdout + good.stderr
    published.decommission("dev-crl")
    revoked = verify()
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr


# -- OCSP protocol details, parsed with cryptography -------------------------------------------


def ocsp_request(published: Published, cert_path: Path, nonce: bytes | None) -> bytes:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    builder = ocsp.OCSPRequestBuilder().add_certificate(
        certificate, published.ca.issuing_cert, hashes.SHA256()
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def test_ocsp_get_answers_and_echoes_the_nonce(published: Published) -> None:
    cert, _ = published.device("dev-get")
    encoded = base64.b64encode(ocsp_request(published, cert, b"n" * 16)).decode()
    response = httpx.get(
        f"{published.publish_url}/ocsp/{httpx.URL(encoded).raw_path.decode()}", timeout=10
    )
    assert response.headers["content-type"] == "application/ocsp-response"
    answer = ocsp.load_der_ocsp_response(response.content)
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    nonce = answer.extensions.get_extension_for_class(x509.OCSPNonce).value
    assert nonce.nonce == b"n" * 16
    assert answer.next_update_utc is not None and answer.next_update_utc > answer.this_update_utc


def test_ocsp_revoked_answer_has_time_and_reason(published: Published) -> None:
    cert, _ = published.device("dev-reason")
    published.decommission("dev-reason")
    response = httpx.post(
        f"{published.publish_url}/ocsp",
        content=ocsp_request(published, cert, None),
        headers={"content-type": "application/ocsp-request"},
        timeout=10,
    )
    answer = ocsp.load_der_ocsp_response(response.content)
    assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_time_utc is not None
    assert abs(answer.revocation_time_utc - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    # No reason code given: the registry's default, as in the CRL entry.
    assert answer.revocation_reason is x509.ReasonFlags.cessation_of_operation
    with pytest.raises(x509.ExtensionNotFound):
        answer.extensions.get_extension_for_class(x509.OCSPNonce)  # none asked, none given


def test_ocsp_answers_are_signed_by_a_delegated_responder(published: Published) -> None:
    cert, _ = published.device("dev-signer")
    response = httpx.post(
        f"{published.publish_url}/ocsp", content=ocsp_request(published, cert, None), timeout=10
    )
    answer = ocsp.load_der_ocsp_response(response.content)
    (responder,) = answer.certificates
    responder.verify_directly_issued_by(published.ca.issuing_cert)
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert answer.responder_key_hash == (
        x509.SubjectKeyIdentifier.from_public_key(responder.public_key()).digest  # type: ignore[arg-type]
    )
    public_key = responder.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert answer.signature_hash_algorithm is not None
    public_key.verify(
        answer.signature, answer.tbs_response_bytes, ec.ECDSA(answer.signature_hash_algorithm)
    )


def test_ocsp_for_another_issuer_is_unknown(published: Published, tmp_path: Path) -> None:
    other = CertificateAuthority.init(DataLayout(tmp_path / "other"), TRUST_DOMAIN)
    foreign = other.issue_client(other.identity(IdentityKind.DEVICE, "dev-foreign"))
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(foreign.certificate, other.issuing_cert, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    response = httpx.post(f"{published.publish_url}/ocsp", content=request, timeout=10)
    answer = ocsp.load_der_ocsp_response(response.content)
    assert answer.certificate_status is ocsp.OCSPCertStatus.UNKNOWN


@pytest.mark.parametrize("method", ["post", "get"])
def test_ocsp_refuses_a_malformed_request(published: Published, method: str) -> None:
    if method == "post":
        response = httpx.post(f"{published.publish_url}/ocsp", content=b"not ocsp", timeout=10)
    else:
        response = httpx.get(f"{published.publish_url}/ocsp/not-base64!", timeout=10)
    answer = ocsp.load_der_ocsp_response(response.content)
    assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_ocsp_refuses_an_oversized_request(published: Published) -> None:
    response = httpx.post(
        f"{published.publish_url}/ocsp", content=b"\0" * (MAX_OCSP_REQUEST + 1), timeout=10
    )
    assert response.status_code == 413


def test_a_busy_database_is_try_later_and_503_not_a_traceback(published: Published) -> None:
    cert, _ = published.device("dev-busy")
    request = ocsp_request(published, cert, None)
    pool = published.registry.state.engine.pool
    assert isinstance(pool, QueuePool)
    with ExitStack() as held:
        for _ in range(pool.size() + pool._max_overflow):  # noqa: SLF001
            held.enter_context(published.registry.state.engine.connect())
        answer = httpx.post(f"{published.publish_url}/ocsp", content=request, timeout=30)
        parsed = ocsp.load_der_ocsp_response(answer.content)
        assert parsed.response_status is ocsp.OCSPResponseStatus.TRY_LATER
        crl = httpx.get(f"{published.publish_url}/crl.der", timeout=30)
        assert crl.status_code == 503
    again = httpx.post(f"{published.publish_url}/ocsp", content=request, timeout=30)
    assert ocsp.load_der_ocsp_response(again.content).certificate_status is ocsp.OCSPCertStatus.GOOD


def test_publication_does_not_serve_the_operator_api(published: Published) -> None:
    response = httpx.get(f"{published.publish_url}/api/v1/devices", timeout=10)
    assert response.status_code == 404


def test_responder_certificate_is_renewed_before_it_expires(published: Published) -> None:
    layout = published.layout
    cert_path = layout.ca_dir / f"{RESPONDER_NAME}.crt"
    key_path = layout.ca_dir / f"{RESPONDER_NAME}.key"
    assert cert_path.exists() and oct(key_path.stat().st_mode & 0o777) == "0o600"
    first = x509.load_pem_x509_certificate(cert_path.read_bytes())
    # A responder that must keep 30 days of life finds the 30-day one due once a third of
    # it is gone: simulate with one issued for 5 days.
    short = published.ca.issue_ocsp_responder(RESPONDER_NAME, lifetime=dt.timedelta(days=5))
    write_issued(short, cert_path, key_path)
    responder = OcspResponder(published.ca, published.registry.state.engine)
    renewed = responder.responder_certificate
    assert renewed.serial_number not in (first.serial_number, short.certificate.serial_number)
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=29)
    on_disk = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert on_disk.serial_number == renewed.serial_number
    # A fresh one on disk is reused, not re-issued.
    again = OcspResponder(published.ca, published.registry.state.engine).responder_certificate
    assert again.serial_number == renewed.serial_number


def test_ocsp_next_update_follows_its_setting(published: Published, tmp_path: Path) -> None:
    cert, _ = published.device("dev-validity", register=False)
    port = free_port()
    settings = RegistrySettings(
        data_dir=published.layout.root,
        registry_addr="127.0.0.1:0",
        registry_publish_addr=f"127.0.0.1:{port}",
        registry_ocsp_next_update_s=300,
        registry_database_url=f"sqlite:///{tmp_path / 'validity.db'}",
    )
    with RegistryServer(settings):
        reply = httpx.post(
            f"http://127.0.0.1:{port}/ocsp", content=ocsp_request(published, cert, None), timeout=10
        )
    answer = ocsp.load_der_ocsp_response(reply.content)
    assert answer.next_update_utc is not None
    # thisUpdate is backdated a minute for slow clocks.
    assert answer.next_update_utc - answer.this_update_utc == dt.timedelta(seconds=360)


def test_publish_addr_in_use_is_one_clear_error(published: Published, tmp_path: Path) -> None:
    assert published.registry.publication is not None
    settings = RegistrySettings(
        data_dir=published.layout.root,
        registry_addr="127.0.0.1:0",
        registry_publish_addr=published.publish_url.removeprefix("http://"),
        registry_database_url=f"sqlite:///{tmp_path / 'other.db'}",
    )
    with (
        pytest.raises(ConfigError, match="cannot listen on --publish-addr"),
        RegistryServer(settings),
    ):
        pass


# -- nginx as a relying party ------------------------------------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

NGINX_CONF = """
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {chain};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_ocsp {ocsp_mode};
        {responder}
        location / {{ return 200 "hello $ssl_client_s_dn\\n"; }}
    }}
}}
"""


@dataclass
class Nginx:
    url: str
    error_log: Path


@pytest.fixture(params=["aia", "responder"])
def nginx(published: Published, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Nginx]:
    """nginx checking client certificates by OCSP at the URL of their AIA, or at the one
    ``ssl_ocsp_responder`` names. ``leaf``: the issuing CA's own certificate is the root's
    to vouch for, and the root has no responder (``ssl_ocsp on`` fails with "no OCSP
    responder URL in certificate" for it; docs/interop.md)."""
    if NGINX is None:
        pytest.skip("nginx not installed (apt-get install nginx, or make system-deps as root)")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    server = published.ca.issue_server("nginx", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    cert, key = prefix / "server.crt", prefix / "server.key"
    write_issued(server, cert, key, intermediate=published.ca.issuing_cert)
    port = free_port()
    by_aia = request.param == "aia"
    config = prefix / "nginx.conf"
    config.write_text(
        NGINX_CONF.format(
            prefix=prefix,
            port=port,
            cert=cert,
            key=key,
            chain=published.layout.chain,
            ocsp_mode="leaf",
            responder="" if by_aia else f"ssl_ocsp_responder {published.publish_url}/ocsp;",
        )
    )
    log = prefix / "error.log"
    process = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(config), "-e", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"nginx exited {process.returncode}: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"nginx did not listen: {log.read_text()}")
                time.sleep(0.05)
        yield Nginx(f"https://127.0.0.1:{port}/", log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def device_get(published: Published, url: str, cert: Path, key: Path) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(published.layout.root_cert))
    context.load_cert_chain(str(cert), str(key))
    with httpx.Client(verify=context, timeout=15) as client:
        return client.get(url)


def test_nginx_lets_a_device_in_then_refuses_it_after_decommission(
    published: Published, nginx: Nginx
) -> None:
    cert, key = published.device("dev-nginx")
    passed = device_get(published, nginx.url, cert, key)
    assert passed.status_code == 200, passed.text
    assert "CN=dev-nginx" in passed.text

    published.decommission("dev-nginx")
    refused = device_get(published, nginx.url, cert, key)
    assert refused.status_code == 400
    assert "SSL certificate error" in refused.text
    assert "client SSL certificate verify error: certificate revoked" in nginx.error_log.read_text()


def test_nginx_refuses_a_device_the_registry_never_registered(
    published: Published, nginx: Nginx
) -> None:
    cert, key = published.device("dev-nginx-unknown", register=False)
    refused = device_get(published, nginx.url, cert, key)
    assert refused.status_code == 400
    assert "certificate status unknown" in nginx.error_log.read_text()


def test_registry_serve_publish_addr_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    layout = DataLayout(tmp_path / "data")
    CertificateAuthority.init(layout, TRUST_DOMAIN, publish_url=f"http://127.0.0.1:{port}")
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "certfleet.cli",
            "registry",
            "serve",
            "--data-dir",
            str(layout.root),
            "--addr",
            "127.0.0.1:0",
            "--publish-addr",
            f"127.0.0.1:{port}",
            "--ready-file",
            str(ready),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CERTFLEET_REGISTRY_PUBLISH_ADDR": ""},
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "registry serve did not get ready"
            time.sleep(0.05)
        crl = httpx.get(f"http://127.0.0.1:{port}/crl.pem", timeout=10)
        assert crl.status_code == 200
        assert x509.load_pem_x509_crl(crl.content).extensions.get_extension_for_class(
            x509.IssuingDistributionPoint
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "publication listening url=http://127.0.0.1:" in stderr
    assert "Traceback" not in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/crl.pem", timeout=2)
