"""Registering a batch over REST: chunks of <= 1000, mTLS or bearer token, TLS verified against
our root, transient errors retried, a 409 stops the batch with a clear error.

The registry is stood in for by a small real HTTPS server that speaks the contract's
``POST /api/v1/devices/batch``.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from factory.ca import CertificateAuthority, write_issued
from factory.errors import RegistrationError
from factory.manifest import Manifest
from factory.provision import provision_batch
from factory.registration import BatchRegistrar, RegistryClient
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, read_identity
from tests.factory.conftest import run_factory


@dataclass
class StubRegistry:
    """Records every call; ``script`` holds (status, body) answers used before the default."""

    url: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    script: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    known: set[str] = field(default_factory=set)


def _handler(stub: StubRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            peer = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            call = {
                "path": self.path,
                "auth": self.headers.get("Authorization"),
                "peer": peer,
                "devices": body["devices"],
            }
            stub.calls.append(call)
            if stub.script:
                status, answer = stub.script.pop(0)
            elif call["auth"] is None and peer is None:
                status, answer = 401, {"detail": "no identity"}
            else:
                pems = [d["certificate_pem"] for d in body["devices"]]
                created = [p for p in pems if p not in stub.known]
                stub.known.update(pems)
                status = 200
                answer = {"created": len(created), "existing": len(pems) - len(created)}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def stub(ca: CertificateAuthority, layout: DataLayout) -> Iterator[StubRegistry]:
    issued = ca.issue_server("registry", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    write_issued(
        issued,
        layout.server_cert("registry"),
        layout.server_key("registry"),
        intermediate=ca.issuing_cert,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(str(layout.chain))
    context.load_cert_chain(str(layout.server_cert("registry")), str(layout.server_key("registry")))
    state = StubRegistry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _factory_client_cert(ca: CertificateAuthority, layout: DataLayout) -> None:
    issued = ca.issue_client(ca.identity(IdentityKind.SERVICE, "factory"))
    write_issued(issued, layout.client_cert("factory"), layout.client_key("factory"))


def test_batch_is_registered_in_chunks_with_the_factory_client_certificate(
    ca: CertificateAuthority, layout: DataLayout, stub: StubRegistry
) -> None:
    from cryptography import x509

    _factory_client_cert(ca, layout)
    client = RegistryClient.connect(stub.url, layout=layout)
    registrar = BatchRegistrar(client, batch_size=400)
    try:
        provision_batch(ca, 1000, workers=1, registrar=registrar)
    finally:
        registrar.close()
    assert [len(c["devices"]) for c in stub.calls] == [400, 400, 200]
    assert {c["path"] for c in stub.calls} == {"/api/v1/devices/batch"}
    peer = x509.load_der_x509_certificate(stub.calls[0]["peer"])
    assert read_identity(peer).uri == "spiffe://fleet.test/service/factory"
    assert stub.calls[0]["auth"] is None
    assert registrar.created == 1000
    pems = [r.certificate_pem for r in Manifest(layout.manifest).records()]
    assert [d["certificate_pem"] for c in stub.calls for d in c["devices"]] == pems


def test_cli_registers_with_a_bearer_token_and_rerun_is_idempotent(
    ca: CertificateAuthority, layout: DataLayout, stub: StubRegistry
) -> None:
    args = ["provision", "--count", "5", "--registry", stub.url, "--data-dir", str(layout.root)]
    result = run_factory([*args, "--json"], env={"CERTFLEET_REGISTRY_TOKEN": "s3cret-token"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["registry"]["created"] == 5
    assert stub.calls[0]["auth"] == "Bearer s3cret-token"
    assert stub.calls[0]["peer"] is None

    again = run_factory([*args, "--json"], env={"CERTFLEET_REGISTRY_TOKEN": "s3cret-token"})
    assert json.loads(again.output)["registry"] == {"url": stub.url, "created": 0, "existing": 5}


def test_transient_errors_are_retried(
    ca: CertificateAuthority, layout: DataLayout, stub: StubRegistry
) -> None:
    _factory_client_cert(ca, layout)
    stub.script = [(503, {"detail": "busy"}), (502, {"detail": "gateway"})]
    client = RegistryClient.connect(stub.url, layout=layout, backoff_s=0.01)
    try:
        assert client.register([{"certificate_pem": "x", "hardware_serial": None}]) == (1, 0)
    finally:
        client.close()
    assert len(stub.calls) == 3


def test_registry_down_too_long_stops_with_a_clear_error(
    ca: CertificateAuthority, layout: DataLayout, stub: StubRegistry
) -> None:
    _factory_client_cert(ca, layout)
    stub.script = [(503, {"detail": "busy"})] * 3
    client = RegistryClient.connect(stub.url, layout=layout, backoff_s=0.01, max_attempts=3)
    with pytest.raises(RegistrationError, match="still failing after 3 attempts \\(HTTP 503\\)"):
        client.register([{"certificate_pem": "x", "hardware_serial": None}])
    client.close()


def test_conflict_stops_the_batch_with_a_clear_error(
    ca: CertificateAuthority, layout: DataLayout, stub: StubRegistry
) -> None:
    _factory_client_cert(ca, layout)
    stub.script = [
        (409, {"detail": {"error": "conflict", "message": "serial abc is bound to dev-9"}})
    ]
    result = run_factory(
        ["provision", "--count", "3", "--registry", stub.url, "--data-dir", str(layout.root)]
    )
    assert isinstance(result.exception, RegistrationError)
    with pytest.raises(RegistrationError, match="conflict: serial abc is bound to dev-9"):
        raise result.exception
    assert len(list(Manifest(layout.manifest).records())) == 3, "the manifest keeps the batch"


def test_refused_credentials_stop_with_a_clear_error(
    ca: CertificateAuthority, layout: DataLayout, stub: StubRegistry
) -> None:
    stub.script = [(403, {"detail": "device identities may not register devices"})]
    client = RegistryClient.connect(stub.url, layout=layout, token="t")
    with pytest.raises(RegistrationError, match="refused the factory's credentials \\(HTTP 403"):
        client.register([{"certificate_pem": "x", "hardware_serial": None}])
    client.close()


def test_missing_credentials_are_refused_before_minting(
    ca: CertificateAuthority, layout: DataLayout, stub: StubRegistry
) -> None:
    result = run_factory(
        ["provision", "--count", "3", "--registry", stub.url, "--data-dir", str(layout.root)],
        env={"CERTFLEET_REGISTRY_TOKEN": ""},
    )
    assert isinstance(result.exception, RegistrationError)
    with pytest.raises(RegistrationError, match="no registry credentials: set CERTFLEET_REG"):
        raise result.exception
    assert not layout.manifest.exists()


def test_registry_with_a_foreign_tls_certificate_is_refused(
    layout: DataLayout, stub: StubRegistry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = DataLayout(tmp_path_factory.mktemp("other-ca"))
    CertificateAuthority.init(other, "other.test")
    client = RegistryClient.connect(stub.url, layout=other, token="t")
    with pytest.raises(RegistrationError, match="TLS to the registry .* failed \\(.*certif"):
        client.register([{"certificate_pem": "x", "hardware_serial": None}])
    client.close()
    assert stub.calls == []
