"""The broker's TLS contexts (built by :mod:`fleetcore.tls`), with the broker's own errors.

How it is wired into amqtt: amqtt's own TCP listener builds its context in
``Broker._create_ssl_context`` with ``verify_mode = CERT_OPTIONAL`` (a client without a
certificate completes the handshake). We do not patch that. The broker is configured with
one amqtt listener of type ``external`` (amqtt's documented hook for connections accepted
by someone else) and :mod:`broker.listener` owns the socket: it terminates TLS with the
context built here (``CERT_REQUIRED``), counts every handshake refusal by reason, and only
then hands the decrypted byte stream to ``Broker.external_connected``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from broker.errors import BrokerTlsError
from fleetcore.layout import DataLayout
from fleetcore.tls import TlsSetupError, TrustFile, server_context, service_client_context

__all__ = ["TrustReloader", "broker_server_context", "feed_client_context"]

log = logging.getLogger(__name__)


def broker_server_context(layout: DataLayout, broker_name: str) -> ssl.SSLContext:
    """The MQTT listener's context: mTLS, a client certificate chaining to our CA required."""
    try:
        return server_context(
            layout.server_cert(broker_name), layout.server_key(broker_name), layout.server_trust
        )
    except TlsSetupError as exc:
        raise BrokerTlsError(
            f"{exc}: run 'certfleet ca issue-server --name {broker_name} --dns localhost "
            "--ip 127.0.0.1' (after 'certfleet ca init'), or pass the right --data-dir"
        ) from None


def feed_client_context(layout: DataLayout, service: str) -> ssl.SSLContext:
    """The revocation feed's client context: the broker's service certificate, our root."""
    try:
        return service_client_context(layout, service)
    except TlsSetupError as exc:
        raise BrokerTlsError(
            f"{exc}: run 'certfleet ca issue-client --service {service}' (or pass the right "
            "--data-dir), or run without --registry-url"
        ) from None


class TrustReloader:
    """Follows ``ca/trust.pem`` (issue 26, :class:`fleetcore.tls.TrustFile`): after
    ``certfleet ca rollover`` writes a new issuing CA there, the running listener trusts it
    within ``interval_s``, with no restart. A *revoked* issuing CA is refused at CONNECT by
    :class:`broker.auth.AdmissionPolicy`."""

    def __init__(
        self, layout: DataLayout, context: ssl.SSLContext, interval_s: float = 1.0
    ) -> None:
        self._trust = TrustFile(lambda: layout.server_trust, context)
        self._interval_s = interval_s

    def check(self) -> bool:
        return self._trust.check()

    def up_to_date(self) -> bool:
        return self._trust.up_to_date()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.check()
