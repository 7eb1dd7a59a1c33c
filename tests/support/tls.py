"""TLS client contexts for talking to the servers a test starts (trusting the session root)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.pki import ClientFiles, TestPKI


def tls_context(pki: TestPKI, client: ClientFiles | None = None) -> ssl.SSLContext:
    """A client context trusting the session root, presenting ``client``'s pair if given."""
    context = ssl.create_default_context(cafile=str(pki.layout.root_cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context
