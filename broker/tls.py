"""The broker's server-side TLS context.

How it is wired into amqtt: amqtt's own TCP listener builds its context in
``Broker._create_ssl_context`` with ``verify_mode = CERT_OPTIONAL`` (a client without a
certificate completes the handshake). We do not patch that. The broker is configured with
one amqtt listener of type ``external`` (amqtt's documented hook for connections accepted
by someone else) and :mod:`broker.listener` owns the socket: it terminates TLS with the
context built here (``CERT_REQUIRED``), counts every handshake refusal by reason, and only
then hands the decrypted byte stream to ``Broker.external_connected``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from broker.errors import BrokerError

__all__ = ["server_context"]


def server_context(*, cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context that requires a client certificate chaining to ``ca_file``."""
    issue = (
        f"run 'certfleet ca issue-server --name {cert_file.stem} --dns localhost "
        "--ip 127.0.0.1' (or pass the right --data-dir)"
    )
    for what, path, fix in (
        ("server certificate", cert_file, issue),
        ("server key", key_file, issue),
        ("CA chain", ca_file, "run 'certfleet ca init' (or pass the right --data-dir)"),
    ):
        if not path.is_file():
            raise BrokerError(f"{what} {path} is missing: {fix}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    # The chain file holds the issuing CA and the root: a device leaf verifies against the
    # issuing CA, whose own signature verifies against the root.
    context.load_verify_locations(cafile=str(ca_file))
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise BrokerError(f"cannot load {cert_file} / {key_file}: {exc}") from None
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # No TLS 1.3 session tickets: devices reconnect rarely, and tickets cost a write per
    # connection plus resumption state that would skip the client-certificate check.
    context.num_tickets = 0
    return context
