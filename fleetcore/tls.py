"""Every TLS context certfleet builds, server and client, under one policy.

In the spirit of trustme's ``configure_trust`` / ``configure_cert``: the parts say which
files to use (usually through the data layout), this module decides how TLS is set up.

The policy, for every context:

- TLS 1.2 minimum; for TLS 1.2 only ECDHE key exchange with AEAD ciphers
  (:data:`TLS12_CIPHERS`; TLS 1.3 suites are all AEAD with forward secrecy already);
- no renegotiation, no compression;
- servers issue no session tickets (``OP_NO_TICKET`` for TLS 1.2, ``num_tickets = 0`` for 1.3):
  devices reconnect rarely, tickets cost a write per connection, and resumption state would
  skip the client-certificate check on the next connection;
- servers verify client certificates against the CA chain (issuing CA + root), and require
  one unless the server says otherwise with :class:`ClientCert` (the registry's HTTPS API,
  see :data:`REGISTRY_CLIENT_CERT`);
- clients trust only our root, verify the server's certificate (``CERT_REQUIRED``) and check
  its host name: every server certificate carries the DNS names and IP addresses it is
  reached at (``certfleet ca issue-server --dns/--ip``). The one exception is the broker's
  link to NATS (:func:`nats_client_context`): NATS is not ours, so it trusts the CA file the
  operator names for it, or the system's trust store.

A file that is missing, unreadable or not what it should be raises :class:`TlsSetupError`
naming the file; each part turns it into its own error with the fix that fits it.
"""

from __future__ import annotations

import enum
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from fleetcore.errors import TlsSetupError
from fleetcore.layout import DataLayout

__all__ = [
    "REGISTRY_CLIENT_CERT",
    "TLS12_CIPHERS",
    "ClientCert",
    "TrustFile",
    "TlsSetupError",
    "client_context",
    "nats_client_context",
    "server_context",
    "service_client_context",
]

#: TLS 1.2 suites: ECDHE (forward secrecy) with AES-GCM or ChaCha20-Poly1305, for ECDSA,
#: Ed25519 and RSA certificates alike.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class ClientCert(enum.Enum):
    """Whether a server asks its clients for a certificate."""

    #: Every client must present a certificate chaining to our CA (mTLS).
    REQUIRED = ssl.CERT_REQUIRED
    #: A client may connect without a certificate; one it presents is verified, and a foreign
    #: or expired one fails the handshake.
    OPTIONAL = ssl.CERT_OPTIONAL


#: The registry's HTTPS API takes callers without a certificate: operators authenticate with
#: bearer tokens (the web console, scripts), while devices and services present their
#: certificates. The API checks who is calling on every request, so the handshake only
#: verifies a certificate when one is offered.
REGISTRY_CLIENT_CERT = ClientCert.OPTIONAL


def _check_readable(what: str, path: Path) -> None:
    if not path.is_file():
        raise TlsSetupError(f"{what} {path} is missing")
    if not os.access(path, os.R_OK):
        raise TlsSetupError(f"{what} {path} is not readable by this user")


def _hardened(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return context


def _load_trust(context: ssl.SSLContext, what: str, ca: Path) -> None:
    _check_readable(what, ca)
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(f"{what} {ca} holds no usable certificate: {exc}") from None


def _load_identity(context: ssl.SSLContext, what: str, cert: Path, key: Path) -> None:
    _check_readable(f"{what} certificate", cert)
    _check_readable(f"{what} key", key)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(
            f"cannot load {what} certificate {cert} with key {key} "
            f"(damaged, encrypted, or not a pair): {exc}"
        ) from None


def server_context(
    cert: Path, key: Path, ca: Path, *, client_cert: ClientCert = ClientCert.REQUIRED
) -> ssl.SSLContext:
    """A server context presenting ``cert``/``key`` and verifying clients against ``ca``.

    ``ca`` is the chain file (issuing CA + root): a device leaf verifies against the issuing
    CA, whose own signature verifies against the root.
    """
    _check_readable("server certificate", cert)
    _check_readable("server key", key)
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    context.verify_mode = client_cert.value
    _load_trust(context, "CA chain", ca)
    _load_identity(context, "server", cert, key)
    return context


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca`` (our root), presenting ``cert``/``key`` when given."""
    if (cert is None) != (key is None):
        raise TlsSetupError("a client certificate needs both its certificate and its key file")
    if cert is not None and key is not None:
        _check_readable("client certificate", cert)
        _check_readable("client key", key)
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    # PROTOCOL_TLS_CLIENT already sets both; stated here because the policy depends on them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    _load_trust(context, "root certificate", ca)
    if cert is not None and key is not None:
        _load_identity(context, "client", cert, key)
    return context


def service_client_context(layout: DataLayout, name: str) -> ssl.SSLContext:
    """The client context of a service or operator whose files are in ``layout``'s clients/."""
    return client_context(layout.root_cert, layout.client_cert(name), layout.client_key(name))


def nats_client_context(url: str, ca: Path | None) -> ssl.SSLContext | None:
    """The broker's client context for its NATS link (the same policy, NATS's own trust).

    With ``ca`` (``CERTFLEET_BROKER_CLUSTER_CA_FILE``): trust that file. Without it, a
    ``tls://`` URL trusts the system's store, and a ``nats://`` URL gets None (plain TCP, for
    a NATS server on loopback).
    """
    if ca is None:
        return _hardened(ssl.create_default_context()) if url.startswith("tls://") else None
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    _load_trust(context, "NATS CA file", ca)
    return context


class TrustFile:
    """Follows a server's CA file (``ca/trust.pem``, issue 26): when it changes (``certfleet
    ca rollover`` added an issuing CA) :meth:`check` adds its certificates to the live
    context's store, so the next handshakes trust the new issuing CA with no restart. A
    certificate removed from the file stays in the store until a restart (a retired issuing
    CA has no live certificate left; a revoked one is refused by the servers' own checks)."""

    def __init__(self, path: Callable[[], Path], context: ssl.SSLContext) -> None:
        self._path = path
        self._context = context
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[str, int, int] | None:
        path = self._path()
        try:
            stat = path.stat()
        except OSError:
            return None
        return str(path), stat.st_ino, stat.st_mtime_ns

    def up_to_date(self) -> bool:
        """Whether the context holds the file as it is on disk now."""
        return self._read_stamp() == self._stamp

    def check(self) -> bool:
        """Load the file again when it changed; True when it did."""
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            self._context.load_verify_locations(cafile=stamp[0])
        except (OSError, ssl.SSLError) as exc:
            _log.error("trust file not reloaded path=%s error=%s", stamp[0], exc)
            return False
        self._stamp = stamp
        _log.info("trust file reloaded path=%s", stamp[0])
        return True


_log = logging.getLogger(__name__)
