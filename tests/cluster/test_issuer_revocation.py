"""A revoked issuing CA (issue 26, ``certfleet ca revoke-issuing``): on two cluster nodes
following the registry's feed, every session of a certificate it signed is dropped within a
second and every such certificate is refused at CONNECT, registered or not; the new issuing
CA's devices stay connected; the revoked devices come back only by re-enrollment."""

from __future__ import annotations

import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.auth import Refusal
from factory.ca import CertificateAuthority, write_issued
from factory.issuers import apply_revocation, issuer_key_id, prepare_revocation
from factory.keys import load_private_key
from fleetcore.keys import build_csr, generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, OperatorRole
from registry.server import RegistryServer
from tests.cluster.conftest import StartNode
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device, new_pki
from tests.support.processes import certfleet_in_process
from tests.support.servers import following_nodes, register
from tests.support.waits import wait_for


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[TestPKI]:
    """A CA of this test alone: it rolls over and revokes its issuing CA."""
    yield new_pki(tmp_path / "ca")


def _client(pki: TestPKI, registry: RegistryServer, name: str, role: OperatorRole) -> httpx.Client:
    ca = pki.ca
    issued = ca.issue_client(ca.identity(IdentityKind.OPERATOR, name), role=role)
    cert, key = pki.layout.client_cert(name), pki.layout.client_key(name)
    write_issued(issued, cert, key)
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    context.load_cert_chain(str(cert), str(key))
    return httpx.Client(base_url=f"{registry.url}/api/v1", verify=context, timeout=30)


def _registry_ca(registry: RegistryServer) -> CertificateAuthority:
    ca = registry.app.state.registry.ca
    assert isinstance(ca, CertificateAuthority)
    return ca


@pytest.mark.alone
def test_a_revoked_issuing_ca_is_cut_off_on_every_node_within_a_second(
    pki: TestPKI,
    registry: RegistryServer,
    operator: httpx.Client,
    start_node: StartNode,
    cluster_layout: DataLayout,
    tmp_path: Path,
) -> None:
    old = [issue_device(pki, tmp_path, f"dev-old-{i}") for i in range(2)]
    unregistered = issue_device(pki, tmp_path, "dev-old-x")  # never registered
    old_id = issuer_key_id(pki.ca.issuing_cert)

    new_id = pki.ca.rollover().key_id  # the CA folder the registry signs from
    shutil.copy(pki.layout.trust, cluster_layout.trust)  # handed to the brokers
    # Before a revocation every service re-keys under the new issuing CA: the registry
    # refuses the old one's certificates too, the brokers' feed certificate included
    # (docs/factory.md). (A running broker following trust.pem: tests/e2e/test_rollover.py.)
    service = pki.client(IdentityKind.SERVICE, "broker")
    shutil.copy(service.cert, cluster_layout.client_cert("broker"))
    shutil.copy(service.key, cluster_layout.client_key("broker"))
    assert wait_for(lambda: _registry_ca(registry).issuing_cert == pki.ca.issuing_cert, 5)
    nodes = following_nodes(start_node, registry.url)
    for i, files in enumerate(old):  # both issuing CAs are accepted during the overlap
        register(operator, files, f"dev-old-{i}")
    fresh = issue_device(pki, tmp_path, "dev-new")
    register(operator, fresh, "dev-new")

    sessions = [connect(nodes[i].port, files, f"dev-old-{i}") for i, files in enumerate(old)]
    survivor = connect(nodes[1].port, fresh, "dev-new")
    try:
        for probe in [*sessions, survivor]:
            assert probe.connected.is_set(), probe.reason
        root_key = load_private_key(pki.layout.root_key)
        cert_path, issuing, arl = prepare_revocation(pki.layout, old_id[:12], root_key)
        body = {
            "issuer_pem": issuing.public_bytes(Encoding.PEM).decode(),
            "arl_pem": arl.public_bytes(Encoding.PEM).decode(),
        }
        with _client(pki, registry, "olga", OperatorRole.OPERATOR) as not_admin:
            refused = not_admin.post("/issuers/revoke", json=body)
            assert refused.status_code == 403, refused.text
        with _client(pki, registry, "ada", OperatorRole.ADMIN) as admin:
            response = admin.post("/issuers/revoke", json=body)
            decided = time.monotonic()
            assert response.status_code == 200, response.text
            assert response.json()["revoked_certificates"] == 2  # the registered devices
        for probe in sessions:
            assert probe.disconnected.wait(5), "a session of the revoked issuing CA stayed"
        assert time.monotonic() - decided < 1.0
        apply_revocation(pki.layout, cert_path, arl)
        assert not survivor.disconnected.is_set(), survivor.reason
    finally:
        for probe in [*sessions, survivor]:
            probe.close()

    for node in nodes:
        for client_id, files in (("dev-old-0", old[0]), ("dev-old-x", unregistered)):
            before = node.metrics.refusal_count(Refusal.REVOKED.value)
            again = connect(node.port, files, client_id)
            try:
                assert not again.connected.is_set()
                assert wait_for(lambda n=node, b=before: n.metrics.refusal_count("revoked") > b)
            finally:
                again.close()
        still = connect(node.port, fresh, "dev-new")
        try:
            assert still.connected.is_set(), still.reason
        finally:
            still.close()

    # The operator's certificate of the revoked issuing CA is refused by the registry now.
    refused = operator.get("/devices/dev-old-0")
    assert refused.status_code == 401, refused.text
    assert "was revoked by the root" in refused.text
    with _client(pki, registry, "rita", OperatorRole.OPERATOR) as rita:
        # The way back proves who the device is: an operator re-enrolls it from a CSR made
        # on the device, and it gets a certificate of the new issuing CA.
        key = generate_key("p256")
        csr = build_csr(key, pki.ca.identity(IdentityKind.DEVICE, "dev-old-0")).public_bytes(
            Encoding.PEM
        )
        answer = rita.post("/devices/dev-old-0/reenroll", json={"csr_pem": csr.decode()})
        assert answer.status_code == 201, answer.text
        chain = x509.load_pem_x509_certificates(answer.json()["chain_pem"].encode())
        assert issuer_key_id(chain[0]) == new_id
        # The brokers (feed certificate of the new issuing CA) still follow the feed.
        survivor = connect(nodes[0].port, fresh, "dev-new")
        try:
            assert survivor.connected.is_set(), survivor.reason
            gone = rita.post("/devices/dev-new/decommission", json={"reason": "retired"})
            assert gone.status_code == 200, gone.text
            assert survivor.disconnected.wait(5)
        finally:
            survivor.close()


def test_revoke_issuing_from_the_cli_needs_an_admin(
    pki: TestPKI, registry: RegistryServer, tmp_path: Path
) -> None:
    old_id = issuer_key_id(pki.ca.issuing_cert)
    pki.ca.rollover()
    for name, role in (("vera", OperatorRole.VIEWER), ("otto", OperatorRole.OPERATOR)):
        issued = pki.ca.issue_client(pki.ca.identity(IdentityKind.OPERATOR, name), role=role)
        write_issued(issued, pki.layout.client_cert(name), pki.layout.client_key(name))
        trust_before = pki.layout.trust.read_bytes()
        result = certfleet_in_process(
            "ca",
            "revoke-issuing",
            "--issuer",
            old_id,
            "--registry",
            registry.url,
            "--operator",
            name,
            "--data-dir",
            str(pki.layout.root),
        )
        assert result.returncode == 2, result
        assert "admin role" in result.stderr, result.stderr
        assert pki.layout.trust.read_bytes() == trust_before  # nothing changed here
        assert not pki.layout.revoked_issuers.exists()
