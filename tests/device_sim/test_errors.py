"""Which failures stop a device for good and which it retries."""

from __future__ import annotations

import errno
import ssl

import pytest

from device_sim.errors import classify_connack, classify_os_error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] alert")
    error.reason = reason  # type: ignore[misc]
    return error


@pytest.mark.parametrize(
    ("reason", "word"),
    [
        ("SSLV3_ALERT_CERTIFICATE_REVOKED", "certificate_revoked"),
        ("TLSV1_ALERT_UNKNOWN_CA", "certificate_unknown_ca"),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "certificate_expired"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "certificate_rejected"),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "certificate_rejected"),
    ],
)
def test_tls_alerts_about_our_certificate_are_permanent(reason: str, word: str) -> None:
    failure = classify_os_error(_ssl_error(reason))
    assert failure.permanent
    assert failure.reason == word


def test_untrusted_server_certificate_is_permanent() -> None:
    failure = classify_os_error(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert failure.permanent
    assert failure.reason == "server_certificate_untrusted"


@pytest.mark.parametrize(
    ("exc", "word"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection_refused"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "connection_reset"),
        (TimeoutError(), "connect_timeout"),
        (OSError(errno.EMFILE, "too many open files"), "too_many_open_files"),
        (_ssl_error("UNEXPECTED_EOF_WHILE_READING"), "tls_error"),
    ],
)
def test_network_trouble_is_transient(exc: BaseException, word: str) -> None:
    failure = classify_os_error(exc)
    assert not failure.permanent
    assert failure.reason == word


@pytest.mark.parametrize(
    ("code", "word", "permanent"),
    [
        (5, "connack_not_authorized", True),
        (0x87, "connack_not_authorized", True),
        (4, "connack_bad_credentials", True),
        (0x86, "connack_bad_credentials", True),
        (2, "connack_identifier_rejected", True),
        (3, "connack_server_unavailable", False),
        (0x88, "connack_server_unavailable", False),
        (0x99, "connack_refused", False),
    ],
)
def test_connack_refusals(code: int, word: str, permanent: bool) -> None:
    failure = classify_connack(code)
    assert (failure.reason, failure.permanent) == (word, permanent)
