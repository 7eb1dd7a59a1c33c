"""TLS for the registry (contexts from :mod:`fleetcore.tls`), and the peer certificate handed
to the app.

uvicorn 0.54 does not fill the ASGI TLS extension. :class:`PeerCertH11Protocol` is uvicorn's
own h11 protocol that, once the handshake is done, wraps the app for that connection so
every request's scope carries ``scope["extensions"]["tls"]`` as the ASGI TLS extension
defines it (``client_cert_chain``: PEM strings, leaf first; ``tls_version``). It is passed
to uvicorn through ``Config(http=PeerCertH11Protocol)``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from fleetcore.layout import DataLayout
from fleetcore.tls import (
    REGISTRY_CLIENT_CERT,
    TlsSetupError,
    server_context,
    service_client_context,
)
from registry.errors import RegistryTlsError

__all__ = [
    "PeerCertH11Protocol",
    "peer_certificate_der",
    "registry_server_context",
    "service_client_context_of",
]

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

Scope = MutableMapping[str, Any]


def registry_server_context(layout: DataLayout, name: str) -> ssl.SSLContext:
    """The HTTPS API's context: a client certificate is optional (:data:`REGISTRY_CLIENT_CERT`)
    but verified against the CA chain when presented."""
    try:
        return server_context(
            layout.server_cert(name),
            layout.server_key(name),
            layout.server_trust,
            client_cert=REGISTRY_CLIENT_CERT,
        )
    except TlsSetupError as exc:
        raise RegistryTlsError(
            f"{exc}: run 'certfleet ca issue-server --name {name}' (or let 'certfleet registry "
            "serve' mint it after 'certfleet ca init'), or pass the right --data-dir"
        ) from None


def service_client_context_of(layout: DataLayout, service: str, purpose: str) -> ssl.SSLContext:
    """A client context for one of the registry's own outgoing connections (MQTT ingest)."""
    try:
        return service_client_context(layout, service)
    except TlsSetupError as exc:
        raise RegistryTlsError(
            f"{purpose} needs the service certificate of {service!r}: {exc}: create it with "
            f"'certfleet ca issue-client --service {service}' "
            "(or run 'certfleet up'), or pass the right --data-dir"
        ) from None


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension for one connection."""
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
        # Not in the extension's text: the verified leaf as DER, to spare a PEM round trip.
        "certfleet_client_cert_der": der,
    }


class _WithTLSExtension:
    """ASGI wrapper adding one connection's TLS extension to each scope."""

    def __init__(self, app: Any, extension: dict[str, Any]) -> None:
        self._app = app
        self._extension = extension

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions["tls"] = self._extension
        scope["extensions"] = extensions
        await self._app(scope, receive, send)


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the ASGI TLS extension in every request scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTLSExtension(self.app, tls_extension(ssl_object))


def peer_certificate_der(scope: Scope) -> bytes | None:
    """The client's verified leaf certificate (DER) from the scope, or None."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls:
        return None
    der = tls.get("certfleet_client_cert_der")
    if der:
        return bytes(der)
    chain = tls.get("client_cert_chain") or []
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None
