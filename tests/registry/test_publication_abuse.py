"""The publication listener under requests it does not expect (issue 22, items 6 and 7):
OCSP requests for several certificates (answered each, checked with ``openssl ocsp``),
garbage, empty, huge and mistyped bodies, the GET form; clients hanging up mid-body (one
counted info line each, never an error-level traceback); and no HSTS on plain HTTP."""

from __future__ import annotations

import base64
import logging
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from registry.publication import MAX_OCSP_REQUEST
from tests.registry.publishing import Published, need_openssl, openssl_ocsp


def _url(published: Published) -> str:
    return f"{published.publish_url}/ocsp"


def _openssl_ocsp(published: Published, *certs: Path) -> subprocess.CompletedProcess[str]:
    """``openssl ocsp`` with one ``-cert`` per certificate: one request for all of them."""
    return openssl_ocsp(published, *certs, extra=("-resp_text",))


def test_openssl_asks_for_several_certificates_in_one_request_and_gets_each(
    published: Published,
) -> None:
    good, _ = published.device("dev-multi-good")
    revoked, _ = published.device("dev-multi-revoked")
    unknown, _ = published.device("dev-multi-unknown", register=False)
    published.decommission("dev-multi-revoked", "keyCompromise")
    result = _openssl_ocsp(published, good, revoked, unknown)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Response verify OK" in output
    assert f"{good}: good" in output
    assert f"{revoked}: revoked" in output
    assert "Reason: keyCompromise" in output
    assert f"{unknown}: unknown" in output
    assert "WARNING" not in output  # openssl warns on a missing or wrong nonce


def _request_for(published: Published, certs: list[Path], nonce: bytes | None) -> bytes:
    """A multi-certificate OCSP request as openssl writes it (``-reqout``)."""
    out = published.layout.root / "multi.req"
    command = [need_openssl(), "ocsp", "-issuer", str(published.layout.issuing_cert)]
    for cert in certs:
        command += ["-cert", str(cert)]
    command += ["-reqout", str(out)] + (["-no_nonce"] if nonce is None else [])
    subprocess.run(command, capture_output=True, check=True, timeout=30)
    return out.read_bytes()


def test_several_certificates_by_post_and_get_answer_each_in_order(
    published: Published,
) -> None:
    certs = [published.device(f"dev-order-{i}")[0] for i in range(3)]
    published.decommission("dev-order-1")
    request = _request_for(published, certs, nonce=b"yes")
    encoded = base64.b64encode(request).decode()
    for answer in (
        httpx.post(
            _url(published),
            content=request,
            headers={"content-type": "application/ocsp-request"},
            timeout=10,
        ),
        httpx.get(f"{_url(published)}/{encoded}", timeout=10),
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/ocsp-response"
        parsed = ocsp.load_der_ocsp_response(answer.content)
        assert parsed.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        serials = [
            x509.load_pem_x509_certificate(cert.read_bytes()).serial_number for cert in certs
        ]
        assert [r.serial_number for r in parsed.responses] == serials
        assert [r.certificate_status for r in parsed.responses] == [
            ocsp.OCSPCertStatus.GOOD,
            ocsp.OCSPCertStatus.REVOKED,
            ocsp.OCSPCertStatus.GOOD,
        ]
        # Signed by the delegated responder, over exactly what was answered.
        public_key = parsed.certificates[0].public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(parsed.signature, parsed.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
        assert parsed.extensions.get_extension_for_class(x509.OCSPNonce) is not None


def test_too_many_certificates_in_one_request_is_a_clean_ocsp_error(
    published: Published,
) -> None:
    cert, _ = published.device("dev-many")
    request = _request_for(published, [cert] * 120, nonce=None)
    assert len(request) < MAX_OCSP_REQUEST
    answer = httpx.post(_url(published), content=request, timeout=10)
    assert answer.status_code == 200
    parsed = ocsp.load_der_ocsp_response(answer.content)
    assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", "application/ocsp-request"),
        (b"\x30\x03\x02\x01\x01", "application/ocsp-request"),  # DER, but not a request
        (b"\x30\x82\xff\xff" + b"\0" * 64, "application/ocsp-request"),  # a lying length
        (b"not ocsp at all", "text/plain"),
        (b'{"serial": 1}', "application/json"),
    ],
)
def test_bodies_that_are_not_a_request_are_malformed_never_a_500(
    published: Published, body: bytes, content_type: str
) -> None:
    answer = httpx.post(
        _url(published), content=body, headers={"content-type": content_type}, timeout=10
    )
    assert answer.status_code == 200
    parsed = ocsp.load_der_ocsp_response(answer.content)
    assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_a_right_request_with_a_wrong_content_type_is_answered(published: Published) -> None:
    cert, _ = published.device("dev-type")
    request = _request_for(published, [cert], nonce=None)
    answer = httpx.post(
        _url(published), content=request, headers={"content-type": "text/plain"}, timeout=10
    )
    parsed = ocsp.load_der_ocsp_response(answer.content)
    assert parsed.certificate_status is ocsp.OCSPCertStatus.GOOD


@pytest.mark.parametrize("path", ["", "/", "/%2F%2F%2F", "/" + "A" * 30_000])
def test_odd_get_forms_are_malformed_or_refused_never_a_500(
    published: Published, path: str
) -> None:
    answer = httpx.get(f"{_url(published)}{path}", timeout=10)
    assert answer.status_code in (200, 404, 405, 413, 414), answer.status_code
    if answer.status_code == 200:
        parsed = ocsp.load_der_ocsp_response(answer.content)
        assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_a_huge_body_is_refused_without_reading_it(published: Published) -> None:
    answer = httpx.post(_url(published), content=b"\x30" * (MAX_OCSP_REQUEST * 64), timeout=30)
    assert answer.status_code == 413


# -- clients that hang up --------------------------------------------------------------------


def _hang_up_mid_body(published: Published, declared: int, sent: bytes) -> None:
    host, port = published.publish_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /ocsp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/ocsp-request\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        sock.sendall(head + sent)
        time.sleep(0.02)  # the server is reading the body now


def test_clients_hanging_up_mid_body_leave_counted_info_lines_not_tracebacks(
    published: Published, caplog: pytest.LogCaptureFixture
) -> None:
    clients = 60
    metrics = published.registry.state.metrics.client_disconnects.labels("publication")
    with caplog.at_level(logging.INFO):
        for _ in range(clients):
            _hang_up_mid_body(published, 2000, b"\x30\x82\x07\xcc" + b"\0" * 100)
        deadline = time.monotonic() + 20
        while metrics._value.get() < clients and time.monotonic() < deadline:
            time.sleep(0.05)
    assert metrics._value.get() == clients
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors[:3]]
    assert not [r for r in caplog.records if r.exc_info]
    lines = [r for r in caplog.records if "client hung up mid-request" in r.getMessage()]
    assert len(lines) == clients
    assert all(r.levelno == logging.INFO for r in lines)
    assert "listener=publication" in lines[0].getMessage()
    # The listener still answers.
    cert, _ = published.device("dev-after-hangups")
    request = _request_for(published, [cert], nonce=None)
    answer = httpx.post(_url(published), content=request, timeout=10)
    assert ocsp.load_der_ocsp_response(answer.content).certificate_status is (
        ocsp.OCSPCertStatus.GOOD
    )
    exposition = published.operator.get("/metrics").text
    sample = 'certfleet_registry_client_disconnects_total{listener="publication"} 60.0'
    assert sample in exposition


def test_the_plain_http_listener_sends_no_hsts(published: Published) -> None:
    for answer in (
        httpx.get(f"{published.publish_url}/crl.der", timeout=10),
        httpx.post(_url(published), content=b"x", timeout=10),
        httpx.get(f"{published.publish_url}/nothing", timeout=10),
    ):
        assert "strict-transport-security" not in answer.headers
