"""Register provisioned devices with the registry over REST (``POST /api/v1/devices/batch``).

The registry is reached over HTTPS verified against our own ``ca/root.crt``, authenticated
with a bearer token or the ``service/factory`` client certificate. Transient failures
(connection errors, timeouts, 429 and 5xx) are retried with exponential backoff; a 409
conflict, refused credentials or a refused certificate stop the batch with a clear error
(the manifest keeps the record, and re-running the same command registers again:
the registry is idempotent on device id + serial).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from factory.errors import RegistrationError
from factory.manifest import ManifestRecord
from fleetcore.errors import RegistryCallError
from fleetcore.layout import DataLayout
from fleetcore.registration_wire import MAX_BATCH
from fleetcore.tls import TlsSetupError, client_context

__all__ = ["MAX_BATCH", "BatchRegistrar", "RegistryClient", "refusal_detail", "tls_context"]

log = logging.getLogger(__name__)

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


def tls_context(root_cert: Path, client_cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """The registry client's context (:func:`fleetcore.tls.client_context`): trust only our
    root, present a client certificate when given."""
    cert, key = client_cert if client_cert is not None else (None, None)
    try:
        return client_context(root_cert, cert, key)
    except TlsSetupError as exc:
        raise RegistrationError(f"cannot set up TLS to the registry: {exc}") from None


class RegistryClient:
    """A small synchronous client for the registry's device registration endpoint."""

    def __init__(
        self,
        base_url: str,
        *,
        context: ssl.SSLContext,
        token: str | None = None,
        max_attempts: int = 6,
        backoff_s: float = 0.2,
        timeout_s: float = 60.0,
    ) -> None:
        base = base_url.rstrip("/")
        if not base.startswith(("https://", "http://")):
            raise RegistrationError(f"registry URL {base_url!r} must start with https://")
        if base.endswith("/api/v1"):
            base = base[: -len("/api/v1")]
        self.base_url = base
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(verify=context, headers=headers, timeout=timeout_s)

    @classmethod
    def connect(
        cls,
        base_url: str,
        *,
        layout: DataLayout,
        token: str | None = None,
        client_name: str = "factory",
        client_kind: str = "service",
        **kwargs: Any,
    ) -> RegistryClient:
        """Trust ``ca/root.crt``; authenticate with ``token`` or ``clients/<client_name>``
        (a certificate of ``client_kind``, named in the hint when it is missing)."""
        client_cert: tuple[Path, Path] | None = None
        if not token:
            cert, key = layout.client_cert(client_name), layout.client_key(client_name)
            if not cert.exists() or not key.exists():
                raise RegistrationError(
                    f"no registry credentials: set CERTFLEET_REGISTRY_TOKEN, or create "
                    f"{cert} with 'certfleet ca issue-client --{client_kind} {client_name}'"
                )
            client_cert = (cert, key)
        return cls(
            base_url, context=tls_context(layout.root_cert, client_cert), token=token, **kwargs
        )

    def register(self, devices: Sequence[dict[str, str | None]]) -> tuple[int, int]:
        """POST one batch (<= MAX_BATCH); return (created, existing)."""
        if len(devices) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} devices per call (got {len(devices)})")
        url = f"{self.base_url}/api/v1/devices/batch"
        payload = {"devices": list(devices)}
        for attempt in range(1, self.max_attempts + 1):
            problem: str
            retry_after: float | None = None
            try:
                response = self._http.post(url, json=payload)
            except httpx.TransportError as exc:
                tls_problem = _tls_failure(exc)
                if tls_problem is not None:
                    raise RegistrationError(
                        f"TLS to the registry {self.base_url} failed ({tls_problem}); it must "
                        "present a server certificate issued by this CA (certfleet ca "
                        "issue-server) and accept ours"
                    ) from None
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200 or response.status_code == 201:
                    body = response.json()
                    return int(body.get("created", 0)), int(body.get("existing", 0))
                if response.status_code not in _TRANSIENT_STATUS:
                    raise _refusal(response)
                problem = f"HTTP {response.status_code}"
                retry_after = _retry_after(response)
            if attempt == self.max_attempts:
                raise RegistrationError(
                    f"registry {self.base_url} still failing after {attempt} attempts "
                    f"({problem}); the manifest has the batch: run the same command again "
                    "when the registry is back"
                )
            delay = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
            delay = min(delay, 10.0)
            log.warning(
                "registry call failed, retrying attempt=%d problem=%r delay_s=%.1f",
                attempt,
                problem,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call to ``<base>/api/v1<path>``, not retried (operator commands: a person
        is watching); an unreachable registry or a TLS failure is a RegistryCallError."""
        try:
            return self._http.request(method, f"{self.base_url}/api/v1{path}", **kwargs)
        except httpx.TransportError as exc:
            tls_problem = _tls_failure(exc)
            if tls_problem is not None:
                raise RegistryCallError(
                    f"TLS to the registry {self.base_url} failed ({tls_problem}); it must "
                    "present a server certificate issued by this CA and accept ours"
                ) from None
            raise RegistryCallError(
                f"registry {self.base_url} unreachable ({type(exc).__name__}: {exc}); is it "
                "running? (certfleet registry serve, or --registry URL)"
            ) from None

    def close(self) -> None:
        self._http.close()


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS error behind a transport error, if any (never transient: not retried)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return getattr(seen, "verify_message", None) or seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return text if "CERTIFICATE_VERIFY_FAILED" in text else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def refusal_detail(response: httpx.Response) -> Any:
    """What a refusing registry answer says: its ``detail``'s message (or the whole
    ``detail``), or the start of a body that is not JSON."""
    try:
        detail: Any = response.json().get("detail")
    except ValueError:
        detail = response.text[:200]
    if isinstance(detail, dict):
        detail = detail.get("message") or detail
    return detail


def _refusal(response: httpx.Response) -> RegistrationError:
    detail = refusal_detail(response)
    status = response.status_code
    if status == 409:
        return RegistrationError(
            f"registry refused the batch with a conflict: {detail} (a serial or hardware "
            "serial is bound to another device; nothing after this batch was registered)"
        )
    if status in (401, 403):
        return RegistrationError(
            f"registry refused the factory's credentials (HTTP {status}: {detail}); use a "
            "service/factory client certificate or an operator token"
        )
    if status == 422:
        return RegistrationError(f"registry rejected the batch as invalid: {detail}")
    return RegistrationError(f"registry answered HTTP {status}: {detail}")


class BatchRegistrar:
    """Buffers manifest records and registers them in calls of at most MAX_BATCH."""

    def __init__(self, client: RegistryClient, batch_size: int = MAX_BATCH) -> None:
        self.client = client
        self.batch_size = min(batch_size, MAX_BATCH)
        self.created = 0
        self.existing = 0
        self._pending: list[dict[str, str | None]] = []

    def add(self, record: ManifestRecord) -> None:
        self._pending.append(
            {"certificate_pem": record.certificate_pem, "hardware_serial": record.hardware_serial}
        )
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = (
                self._pending[: self.batch_size],
                self._pending[self.batch_size :],
            )
            created, existing = self.client.register(batch)
            self.created += created
            self.existing += existing
            log.info(
                "devices registered created=%d existing=%d total_created=%d",
                created,
                existing,
                self.created,
            )

    def close(self) -> None:
        self.client.close()
