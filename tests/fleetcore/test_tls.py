"""fleetcore.tls: one TLS policy for every server and client context, pinned.

Handshakes run between two real ``ssl`` objects over memory BIOs (the broker terminates TLS
the same way), with certificates from our own factory.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from broker.errors import BrokerTlsError
from broker.tls import broker_server_context, feed_client_context
from device_sim.bundle import DeviceBundle
from device_sim.bundle import tls_context as device_tls_context
from device_sim.errors import BundleError
from factory.ca import CertificateAuthority, write_issued
from factory.errors import RegistrationError
from factory.registration import tls_context as registration_tls_context
from fleetcore.errors import ConfigError
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from fleetcore.tls import (
    REGISTRY_CLIENT_CERT,
    ClientCert,
    TlsSetupError,
    client_context,
    nats_client_context,
    server_context,
    service_client_context,
)
from registry.errors import RegistryTlsError
from registry.tls import registry_server_context, service_client_context_of
from tests.support.pki import ClientFiles, TestPKI


class _HandshakeFailed(Exception):
    pass


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> bool:
    data = src.read()
    if data:
        dst.write(data)
    return bool(data)


def _step(obj: ssl.SSLObject) -> bool:
    try:
        obj.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    return True


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, *, hostname: str = "localhost"
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a full handshake (and one exchange, so TLS 1.3 tickets would arrive)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s_obj = server.wrap_bio(s_in, s_out, server_side=True)
    c_obj = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    try:
        for _ in range(20):
            c_done = _step(c_obj)
            _pump(c_out, s_in)
            s_done = _step(s_obj)
            _pump(s_out, c_in)
            if c_done and s_done:
                break
        else:
            raise _HandshakeFailed("handshake did not finish")
        # TLS 1.3: the client certificate is checked, and tickets sent, after the handshake.
        c_obj.write(b"ping")
        _pump(c_out, s_in)
        assert s_obj.read(4) == b"ping"
        s_obj.write(b"pong")
        _pump(s_out, c_in)
        assert c_obj.read(4) == b"pong"
    except ssl.SSLError as exc:
        raise _HandshakeFailed(str(exc)) from exc
    return s_obj, c_obj


@pytest.fixture(scope="module")
def broker_files(pki: TestPKI) -> tuple[Path, Path]:
    return pki.server("tls-test")


@pytest.fixture(scope="module")
def device(pki: TestPKI) -> ClientFiles:
    return pki.client(IdentityKind.DEVICE, "tls-dev-1")


def _server(pki: TestPKI, files: tuple[Path, Path], policy: ClientCert) -> ssl.SSLContext:
    return server_context(files[0], files[1], pki.layout.chain, client_cert=policy)


def _assert_hardened(context: ssl.SSLContext) -> None:
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suite left"
    assert all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12), tls12


def test_the_server_context_requires_a_client_certificate_and_issues_no_tickets(
    pki: TestPKI, broker_files: tuple[Path, Path]
) -> None:
    context = server_context(*broker_files, pki.layout.chain)
    _assert_hardened(context)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_TICKET
    assert context.num_tickets == 0


def test_the_registry_server_context_takes_callers_without_a_certificate(
    pki: TestPKI,
) -> None:
    pki.server("registry")
    context = registry_server_context(pki.layout, "registry")
    _assert_hardened(context)
    assert REGISTRY_CLIENT_CERT is ClientCert.OPTIONAL
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.options & ssl.OP_NO_TICKET
    assert context.num_tickets == 0


def test_client_contexts_verify_the_server_and_its_host_name(
    pki: TestPKI, device: ClientFiles
) -> None:
    operator = pki.client(IdentityKind.OPERATOR, "tls-alice")
    contexts = [
        client_context(pki.layout.root_cert),
        client_context(device.root, device.cert, device.key),
        service_client_context(pki.layout, f"{IdentityKind.OPERATOR.value}-tls-alice"),
        registration_tls_context(pki.layout.root_cert, (operator.cert, operator.key)),
    ]
    for context in contexts:
        _assert_hardened(context)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname is True


def test_the_broker_and_the_registry_build_their_outgoing_contexts_from_the_layout(
    pki: TestPKI,
) -> None:
    pki.client(IdentityKind.SERVICE, "tls-svc")
    name = f"{IdentityKind.SERVICE.value}-tls-svc"
    for context in (
        feed_client_context(pki.layout, name),
        service_client_context_of(pki.layout, name, "telemetry ingest"),
    ):
        _assert_hardened(context)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_the_nats_link_context_follows_the_policy_and_trusts_only_the_named_ca(
    pki: TestPKI, broker_files: tuple[Path, Path], tmp_path: Path
) -> None:
    context = nats_client_context("tls://127.0.0.1:4222", pki.layout.root_cert)
    assert context is not None
    _assert_hardened(context)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    handshake(_server(pki, broker_files, ClientCert.OPTIONAL), context)

    foreign = CertificateAuthority.init(DataLayout(tmp_path / "foreign"), "other.test")
    issued = foreign.issue_server("nats", dns_names=["localhost"], ip_addresses=[])
    write_issued(issued, tmp_path / "nats.crt", tmp_path / "nats.key")
    impostor = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor.load_cert_chain(tmp_path / "nats.crt", tmp_path / "nats.key")
    with pytest.raises(_HandshakeFailed, match="certificate verify failed"):
        handshake(impostor, context)

    # Without a CA file: the system's store for tls://, plain TCP for nats:// (loopback).
    system = nats_client_context("tls://nats.example:4222", None)
    assert system is not None
    _assert_hardened(system)
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    assert nats_client_context("nats://127.0.0.1:4222", None) is None
    missing = tmp_path / "nats-ca.pem"
    with pytest.raises(TlsSetupError, match=f"NATS CA file {missing} is missing"):
        nats_client_context("tls://127.0.0.1:4222", missing)


def test_mtls_server_accepts_our_device_and_refuses_a_client_without_certificate(
    pki: TestPKI, broker_files: tuple[Path, Path], device: ClientFiles
) -> None:
    server = _server(pki, broker_files, ClientCert.REQUIRED)
    served, _ = handshake(server, client_context(device.root, device.cert, device.key))
    assert served.getpeercert() is not None
    with pytest.raises(_HandshakeFailed):
        handshake(server, client_context(pki.layout.root_cert))


def test_optional_server_accepts_no_certificate_but_verifies_one_presented(
    pki: TestPKI, broker_files: tuple[Path, Path], device: ClientFiles, tmp_path: Path
) -> None:
    server = _server(pki, broker_files, ClientCert.OPTIONAL)
    served, _ = handshake(server, client_context(pki.layout.root_cert))
    assert served.getpeercert() in (None, {})
    served, _ = handshake(server, client_context(device.root, device.cert, device.key))
    assert served.getpeercert()

    foreign = CertificateAuthority.init(DataLayout(tmp_path / "foreign"), "other.test")
    issued = foreign.issue_client(foreign.identity(IdentityKind.DEVICE, "intruder"))
    write_issued(issued, tmp_path / "intruder.crt", tmp_path / "intruder.key")
    # The intruder trusts our root (so its own side is happy), but presents a foreign leaf.
    intruder = client_context(
        pki.layout.root_cert, tmp_path / "intruder.crt", tmp_path / "intruder.key"
    )
    with pytest.raises(_HandshakeFailed):
        handshake(server, intruder)


def test_no_session_tickets_from_our_servers(
    pki: TestPKI, broker_files: tuple[Path, Path], device: ClientFiles
) -> None:
    ours = _server(pki, broker_files, ClientCert.REQUIRED)
    _, client = handshake(ours, client_context(device.root, device.cert, device.key))
    assert client.version() == "TLSv1.3"
    assert client.session is not None and not client.session.has_ticket

    # The same exchange against a default server does hand out a ticket: the check can fail.
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    default.load_cert_chain(*broker_files)
    _, client = handshake(default, client_context(pki.layout.root_cert))
    assert client.session is not None and client.session.has_ticket


def test_clients_refuse_a_server_at_another_name_and_servers_refuse_tls_1_1(
    pki: TestPKI, broker_files: tuple[Path, Path], device: ClientFiles
) -> None:
    server = _server(pki, broker_files, ClientCert.OPTIONAL)
    with pytest.raises(_HandshakeFailed, match="match|mismatch|hostname"):
        handshake(server, client_context(pki.layout.root_cert), hostname="elsewhere.test")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.layout.root_cert)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(_HandshakeFailed):
        handshake(server, old)


def test_a_missing_or_mismatched_file_is_named_and_each_part_says_how_to_fix_it(
    pki: TestPKI, broker_files: tuple[Path, Path], device: ClientFiles, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(TlsSetupError, match=f"server key {missing} is missing"):
        server_context(broker_files[0], missing, pki.layout.chain)
    with pytest.raises(TlsSetupError, match="not a pair"):
        server_context(broker_files[0], device.key, pki.layout.chain)
    with pytest.raises(TlsSetupError, match="both its certificate and its key"):
        client_context(pki.layout.root_cert, device.cert)
    assert issubclass(TlsSetupError, ConfigError)

    empty = DataLayout(tmp_path / "empty")
    with pytest.raises(BrokerTlsError, match="is missing: run 'certfleet ca issue-server"):
        broker_server_context(empty, "broker")
    with pytest.raises(BrokerTlsError, match="without --registry-url"):
        feed_client_context(empty, "broker")
    with pytest.raises(RegistryTlsError, match="issue-server --name registry"):
        registry_server_context(empty, "registry")
    ingest = "^telemetry ingest needs the service certificate .*issue-client --service"
    with pytest.raises(RegistryTlsError, match=ingest):
        service_client_context_of(empty, "registry", "telemetry ingest")
    with pytest.raises(RegistrationError, match="cannot set up TLS to the registry"):
        registration_tls_context(empty.root_cert, None)

    bundle = DeviceBundle("dev-1", device.cert, missing, device.root, broker=None)
    with pytest.raises(BundleError, match=f"device dev-1: client key {missing} is missing"):
        device_tls_context(bundle)
