"""Checking a batch of device certificates, spread over worker processes when it is large.

Parsing and verifying a certificate costs about 0.2 ms of CPU, most of it the ECDSA
signature check and the identity read; at thousands per second that is the registration
path's bottleneck, and in one process it is bound by the GIL. Batches of at least
``PARALLEL_MIN`` certificates are therefore split over a pool of worker processes (spawned
once, lazily; each holds the issuing certificate). Small requests are checked inline.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from registry.certs import ParsedCertificate, parse_device_certificate
from registry.errors import InvalidCertificateError

__all__ = ["PARALLEL_MIN", "BatchVerifier"]

log = logging.getLogger(__name__)

#: Batches at least this large go to the worker processes.
PARALLEL_MIN = 64

_worker_issuing: list[x509.Certificate] | None = None
_worker_trust_domain = ""

#: The trusted issuing CAs (current first): after a rollover, more than one.
Issuers = x509.Certificate | Callable[[], Sequence[x509.Certificate]]


def _init_worker(issuing_pem: bytes, trust_domain: str) -> None:
    global _worker_issuing, _worker_trust_domain
    _worker_issuing = x509.load_pem_x509_certificates(issuing_pem)
    _worker_trust_domain = trust_domain


def _parse_chunk(
    pems: Sequence[str],
    offset: int,
    issuing: Sequence[x509.Certificate] | None = None,
    trust_domain: str | None = None,
) -> list[ParsedCertificate]:
    issuing = issuing if issuing is not None else _worker_issuing
    assert issuing is not None, "worker not initialized"
    domain = trust_domain if trust_domain is not None else _worker_trust_domain
    parsed = []
    for index, pem in enumerate(pems, start=offset):
        try:
            parsed.append(parse_device_certificate(pem, issuing_cert=issuing, trust_domain=domain))
        except InvalidCertificateError as exc:
            raise InvalidCertificateError(f"devices[{index}]: {exc}") from None
    return parsed


class BatchVerifier:
    """Parse and verify device certificates against the trusted issuing CAs (a certificate,
    or a callable giving the current list: the pool is restarted when it changes)."""

    def __init__(
        self,
        issuing_cert: Issuers,
        trust_domain: str,
        processes: int | None = None,
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        self._on_crash = on_crash
        self._issuing = issuing_cert
        self._pool_issuers: tuple[x509.Certificate, ...] = ()
        self._trust_domain = trust_domain
        self._processes = (os.cpu_count() or 1) if processes is None else processes
        self._pool: Executor | None = None
        self._lock = threading.Lock()

    def _issuers(self) -> tuple[x509.Certificate, ...]:
        if isinstance(self._issuing, x509.Certificate):
            return (self._issuing,)
        return tuple(self._issuing())

    def _executor(self) -> Executor:
        issuers = self._issuers()
        with self._lock:
            if self._pool is not None and self._pool_issuers != issuers:
                # A rollover: the workers hold the old list.
                self._pool.shutdown(wait=False)
                self._pool = None
            if self._pool is None:
                self._pool_issuers = issuers
                self._pool = ProcessPoolExecutor(
                    max_workers=self._processes,
                    # spawn: the registry runs threads (uvicorn, the DB pool); fork would copy
                    # their locks mid-flight.
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(
                        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issuers),
                        self._trust_domain,
                    ),
                )
                log.info("certificate verify pool started processes=%d", self._processes)
            return self._pool

    def parse(self, pems: Sequence[str]) -> list[ParsedCertificate]:
        """Parsed certificates in input order; raise InvalidCertificateError naming the
        first bad one by its index (``devices[i]: ...``)."""
        if len(pems) < PARALLEL_MIN or self._processes < 2:
            return _parse_chunk(pems, 0, self._issuers(), self._trust_domain)
        try:
            return self._parse_parallel(pems)
        except BrokenProcessPool:
            # A worker process died (OOM killer, SIGKILL): the pool is unusable for good.
            # Replace it once, and say so, instead of failing every later batch.
            log.error("certificate verify pool broken; starting a new one")
            if self._on_crash is not None:
                self._on_crash("verify-pool")
            with self._lock:
                broken, self._pool = self._pool, None
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            return self._parse_parallel(pems)

    def _parse_parallel(self, pems: Sequence[str]) -> list[ParsedCertificate]:
        size = -(-len(pems) // self._processes)
        executor = self._executor()
        futures = [
            executor.submit(_parse_chunk, list(pems[start : start + size]), start)
            for start in range(0, len(pems), size)
        ]
        parsed: list[ParsedCertificate] = []
        for future in futures:  # in order, so the first bad index is the one reported
            parsed += future.result()
        return parsed

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
