"""Renew a device's certificate over MQTT, as firmware would (DESIGN.md, "MQTT topics").

The device generates a new key (it never leaves the device), builds a CSR for its own
identity, connects to the broker with its *current* certificate, subscribes to
``devices/<id>/cert/issued``, publishes the CSR on ``devices/<id>/cert/renew`` (QoS 1) and
waits for the answer: the new leaf certificate (PEM), or a JSON refusal
``{"error": ..., "message": ...}`` from the registry (both read by
:func:`fleetcore.renewal_wire.parse_answer`).

A certificate is accepted only if it is for this device's identity, certifies the new key,
and is signed by the issuing CA in the bundle's ``chain.pem``. Then the two-phase swap
(:mod:`device_sim.credentials`): the new pair is staged, the device connects with it, and only
once that connection is up is it promoted (the old pair kept as ``previous/``); over that
connection the device publishes the confirm ``{"confirm": "<serial>"}`` and waits for
``{"confirmed": "<serial>"}``. If the new pair cannot connect, it is discarded and the bundle
is as it was.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from device_sim.bundle import DeviceBundle, tls_context
from device_sim.credentials import Credentials, CredentialStore
from device_sim.errors import (
    CertificateExpiredError,
    RenewalFailedError,
    RenewalRefusedError,
    SimError,
)
from fleetcore.clock import utcnow
from fleetcore.errors import IdentityError
from fleetcore.keys import build_csr, generate_key, private_key_pem
from fleetcore.layout import write_public
from fleetcore.profile import Identity, IdentityKind, PublicKey, read_identity, serial_hex
from fleetcore.renewal_wire import (
    AnswerError,
    Confirmed,
    Refusal,
    answer_issuers,
    confirm_payload,
    parse_answer,
)
from fleetcore.topics import issued_topic, renew_topic

__all__ = [
    "BAD_ANSWER",
    "CertificateExpiredError",
    "RenewalRefusedError",
    "RenewalResult",
    "RenewalFailedError",
    "adopt_issuing",
    "check_certificate",
    "issuing_of_answer",
    "renew_bundle",
    "request_certificate",
]

log = logging.getLogger(__name__)

PEM = serialization.Encoding.PEM
#: The device's own code for an answer it cannot use (never sent by the registry).
BAD_ANSWER = "bad_answer"


@dataclass(frozen=True, slots=True)
class RenewalResult:
    device_id: str
    previous_serial: str
    serial: str
    not_before: str
    not_after: str
    #: the registry acknowledged the confirm sent over the new certificate's connection
    confirmed: bool = False

    def as_dict(self) -> dict[str, str | bool]:
        return {
            "confirmed": self.confirmed,
            "device_id": self.device_id,
            "previous_serial": self.previous_serial,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


class _Exchange:
    """One paho client on its own network thread: connect, subscribe, publish, one answer."""

    def __init__(
        self,
        bundle: DeviceBundle,
        host: str,
        port: int,
        context: ssl.SSLContext | None = None,
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        self.device_id = bundle.device_id
        self.answer: bytes | None = None
        self.failure: str | None = None
        self._subscribed = threading.Event()
        self._done = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=bundle.device_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        self._client.tls_set_context(context or tls_context(bundle))
        self._on_subscribed = on_subscribed
        self._client.reconnect_delay_set(60, 120)  # one attempt: the caller reports failures
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._host, self._port = host, port

    def run(self, csr_pem: bytes, timeout: float) -> bytes:
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise RenewalFailedError(
                f"device {self.device_id}: cannot connect to the broker at "
                f"{self._host}:{self._port}: {exc}"
            ) from None
        self._client.loop_start()
        try:
            if not self._subscribed.wait(timeout) or self.failure is not None:
                raise RenewalFailedError(
                    f"device {self.device_id}: could not subscribe to "
                    f"{issued_topic(self.device_id)}: {self.failure or 'no answer'}"
                )
            if self._on_subscribed is not None:
                self._on_subscribed()  # connected and subscribed: e.g. promote the new pair
            self._client.publish(renew_topic(self.device_id), csr_pem, qos=1)
            if not self._done.wait(timeout) or self.answer is None:
                raise RenewalFailedError(
                    f"device {self.device_id}: no answer on {issued_topic(self.device_id)} "
                    f"within {timeout:g} s ({self.failure or 'the broker kept the connection'}); "
                    "is the registry connected to the broker "
                    "(CERTFLEET_TELEMETRY_BROKER_ADDR) with renewal enabled?"
                )
            return self.answer
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.failure = f"broker refused the connection: {reason}"
            self._subscribed.set()
            self._done.set()
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # no Nagle delay on the CSR after the SUBACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(issued_topic(self.device_id), qos=1)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any
    ) -> None:
        if any(getattr(code, "is_failure", False) for code in codes):
            self.failure = "the broker refused the subscription"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.answer is None:
            self.answer = bytes(message.payload)
            self._done.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if not self._done.is_set():
            self.failure = self.failure or f"disconnected by the broker: {reason}"
            self._subscribed.set()
            self._done.set()


def _interpret(device_id: str, answer: bytes) -> x509.Certificate:
    try:
        parsed = parse_answer(answer)
    except AnswerError as exc:
        raise RenewalRefusedError(BAD_ANSWER, f"device {device_id}: {exc}") from None
    if isinstance(parsed, Refusal):
        raise RenewalRefusedError(
            parsed.error, f"registry refused the renewal of {device_id}: {parsed.message}"
        )
    if isinstance(parsed, Confirmed):
        raise RenewalRefusedError(
            BAD_ANSWER, f"device {device_id}: a confirmation came instead of a certificate"
        )
    return parsed


def request_certificate(
    bundle: DeviceBundle, host: str, port: int, csr_pem: bytes, *, timeout: float = 30.0
) -> x509.Certificate:
    """Send ``csr_pem`` for ``bundle``'s device; the certificate, or RenewalRefusedError /
    RenewalFailedError."""
    answer = _Exchange(bundle, host, port).run(csr_pem, timeout)
    return _interpret(bundle.device_id, answer)


def check_certificate(
    certificate: x509.Certificate,
    identity: Identity,
    public_key: PublicKey,
    issuing: x509.Certificate,
) -> None:
    """Refuse (RenewalRefusedError ``bad_answer``) a certificate that is not for
    ``identity`` and ``public_key`` or not signed by ``issuing``."""
    try:
        certificate.verify_directly_issued_by(issuing)
        found = read_identity(certificate)
    except (ValueError, TypeError, InvalidSignature, IdentityError) as exc:
        raise RenewalRefusedError(
            BAD_ANSWER, f"device {identity.name}: the issued certificate is unusable: {exc}"
        ) from None
    if found != identity or certificate.public_key() != public_key:
        raise RenewalRefusedError(
            BAD_ANSWER,
            f"device {identity.name}: the issued certificate is for {found.uri} or another key",
        )


def issuing_of_answer(
    answer: bytes, issuing: x509.Certificate, root_path: Path
) -> x509.Certificate:
    """The issuing CA to check a renewal answer against: the bundle's (``issuing``), or,
    after the fleet's CA rolled over (docs/factory.md), the new one the answer carries, once
    it is shown to be a CA signed by the bundle's root. Anything else: the bundle's, and the
    answer's leaf then fails :func:`check_certificate`."""
    for candidate in answer_issuers(answer):
        if candidate == issuing:
            return issuing
        try:
            root = x509.load_pem_x509_certificate(root_path.read_bytes())
            candidate.verify_directly_issued_by(root)
            is_ca = candidate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        if is_ca:
            return candidate
    return issuing


def adopt_issuing(directory: Path, issuing: x509.Certificate) -> bool:
    """After a renewal by a new issuing CA: ``chain.pem`` becomes it + the root (replaced by
    rename: a hard-linked chain of other bundles is never changed). True when it changed."""
    chain = directory / "chain.pem"
    if x509.load_pem_x509_certificates(chain.read_bytes())[0] == issuing:
        return False
    root = (directory / "root.crt").read_bytes()
    write_public(chain, issuing.public_bytes(PEM) + root)
    return True


def _prove_and_confirm(
    bundle: DeviceBundle,
    host: str,
    port: int,
    store: CredentialStore,
    staged: Credentials,
    serial: str,
    timeout: float,
) -> bool:
    """Connect with the staged pair; once connected, promote it and confirm it over that
    connection. False when the confirm went unanswered or was refused (the renewal stands)."""
    promoted = threading.Event()

    def promote() -> None:
        store.promote()
        promoted.set()

    context = tls_context(bundle, staged.cert, staged.key)
    exchange = _Exchange(bundle, host, port, context=context, on_subscribed=promote)
    try:
        answer = exchange.run(confirm_payload(serial), timeout)
    except RenewalFailedError as exc:
        if not promoted.is_set():
            store.discard()
            raise RenewalFailedError(
                f"{exc}; the renewed certificate could not be used, the old one is kept"
            ) from None
        log.warning("confirm unanswered device_id=%s serial=%s", bundle.device_id, serial)
        return False
    try:
        parsed = parse_answer(answer)
    except AnswerError:
        return False
    if isinstance(parsed, Confirmed) and parsed.serial == serial:
        return True
    log.warning("confirm not acknowledged device_id=%s serial=%s", bundle.device_id, serial)
    return False


def renew_bundle(
    directory: Path,
    host: str,
    port: int,
    *,
    timeout: float = 30.0,
    key_algorithm: str = "p256",
) -> RenewalResult:
    """Renew the certificate of the bundle in ``directory`` and write the new pair into it."""
    bundle = DeviceBundle.load(directory)
    try:
        current = x509.load_pem_x509_certificate(bundle.cert.read_bytes())
        identity = read_identity(current)
        issuing = x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes())[0]
    except (OSError, ValueError, IdentityError) as exc:
        raise SimError(f"device bundle {directory} cannot be renewed: {exc}") from None
    if identity.kind is not IdentityKind.DEVICE or identity.name != bundle.device_id:
        raise SimError(f"{bundle.cert} is not the certificate of device {bundle.device_id}")
    if current.not_valid_after_utc <= utcnow():
        raise CertificateExpiredError(
            f"the certificate of device {bundle.device_id} expired at "
            f"{current.not_valid_after_utc.isoformat()}: it cannot renew over MQTT (the broker "
            "refuses the TLS handshake). Re-provision it at the line: a new CSR signed by "
            "'certfleet factory sign-csr' (docs/lifecycle.md)"
        )

    try:
        key = generate_key(key_algorithm)
    except ValueError as exc:
        raise SimError(str(exc)) from None
    csr_pem = build_csr(key, identity).public_bytes(PEM)
    certificate = request_certificate(bundle, host, port, csr_pem, timeout=timeout)
    check_certificate(certificate, identity, key.public_key(), issuing)

    serial = serial_hex(certificate.serial_number)
    store = CredentialStore(directory)
    staged = store.stage(private_key_pem(key), certificate.public_bytes(PEM))
    confirmed = _prove_and_confirm(bundle, host, port, store, staged, serial, timeout)
    result = RenewalResult(
        device_id=bundle.device_id,
        previous_serial=serial_hex(current.serial_number),
        serial=serial,
        not_before=certificate.not_valid_before_utc.isoformat(),
        not_after=certificate.not_valid_after_utc.isoformat(),
        confirmed=confirmed,
    )
    log.info(
        "certificate renewed device_id=%s serial=%s previous_serial=%s not_after=%s",
        result.device_id,
        result.serial,
        result.previous_serial,
        result.not_after,
    )
    return result
