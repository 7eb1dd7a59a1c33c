"""The certificates a running fleet needs besides device bundles: server certificates for
the broker and the registry, and service/operator client certificates. Created when missing,
never overwritten."""

from __future__ import annotations

import logging
from pathlib import Path

from factory.ca import CertificateAuthority, write_issued
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, serial_hex

__all__ = ["SERVICES", "ensure_client_cert", "ensure_server_cert", "ensure_service_certs"]

log = logging.getLogger(__name__)

#: Service identities the parts use: the broker reads the feed, the registry ingests
#: telemetry, the factory registers devices.
SERVICES = ("broker", "registry", "factory")


def ensure_server_cert(ca: CertificateAuthority, layout: DataLayout, name: str) -> Path:
    """``tls/<name>.crt`` (leaf + issuing CA) for 127.0.0.1 and localhost; created if missing."""
    cert, key = layout.server_cert(name), layout.server_key(name)
    if not (cert.exists() and key.exists()):
        issued = ca.issue_server(name, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        write_issued(issued, cert, key, intermediate=ca.issuing_cert)
        log.info(
            "server certificate issued name=%s serial=%s",
            name,
            serial_hex(issued.certificate.serial_number),
        )
    return cert


def ensure_client_cert(
    ca: CertificateAuthority, layout: DataLayout, kind: IdentityKind, name: str
) -> Path:
    """``clients/<name>.crt|.key`` for ``spiffe://<td>/<kind>/<name>``; created if missing."""
    cert, key = layout.client_cert(name), layout.client_key(name)
    if not (cert.exists() and key.exists()):
        identity = ca.identity(kind, name)
        issued = ca.issue_client(identity)
        write_issued(issued, cert, key)
        log.info(
            "client certificate issued identity=%s serial=%s",
            identity.uri,
            serial_hex(issued.certificate.serial_number),
        )
    return cert


def ensure_service_certs(ca: CertificateAuthority, layout: DataLayout) -> None:
    for name in ("broker", "registry"):
        ensure_server_cert(ca, layout, name)
    for name in SERVICES:
        ensure_client_cert(ca, layout, IdentityKind.SERVICE, name)
