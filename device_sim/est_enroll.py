"""Zero-touch enrollment of simulated devices over EST (RFC 7030), before they publish.

A device starts with only its batch's claim certificate (``claims/<batch>/`` as
``certfleet factory claim create`` writes it) and its hardware serial. It makes its own key,
builds a CSR naming only that serial (subject serialNumber: the registry decides the device
id from the claim's allow-list, never from the CSR alone), and POSTs it base64 DER to
``<registry>/.well-known/est/simpleenroll`` on a new TLS connection authenticated by the
claim (client auth). The answer (certs-only PKCS#7, base64) holds its certificate; the device
writes its bundle in the factory's layout (:func:`device_sim.bundle.write_enrolled_bundle`)
and from there on is an ordinary simulated device (:class:`device_sim.runner.SimRun`).

Enrollments run with bounded concurrency. A refusal (quota, allow-list, expired or revoked
claim) is one line per device and counted, never an exception for the run.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from device_sim.bundle import DeviceBundle, write_enrolled_bundle
from device_sim.errors import BundleError, EstEnrollmentError, SimError
from fleetcore.bundle_format import bundle_info
from fleetcore.errors import IdentityError
from fleetcore.keys import generate_key, private_key_pem
from fleetcore.profile import (
    HARDWARE_SERIAL_PATTERN,
    Identity,
    IdentityKind,
    read_identity,
    serial_hex,
)
from fleetcore.tls import TlsSetupError, client_context

__all__ = [
    "ClaimCredentials",
    "EnrollmentReport",
    "EstEnrollmentError",
    "enroll_fleet",
    "hardware_serials",
]

log = logging.getLogger(__name__)

EST_PATH: Final = "/.well-known/est/simpleenroll"
_CLAIM_FILES: Final = ("claim.crt", "claim.key", "chain.pem", "root.crt")
#: Largest answer a device reads (a certs-only PKCS#7 of one certificate is ~1 KiB).
_MAX_ANSWER: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ClaimCredentials:
    """A batch's claim as the factory wrote it: ``claims/<batch>/``."""

    batch: str
    cert: Path
    key: Path
    chain: Path
    root: Path

    @classmethod
    def load(cls, directory: Path) -> ClaimCredentials:
        missing = [name for name in _CLAIM_FILES if not (directory / name).is_file()]
        if missing:
            raise BundleError(
                f"claim folder {directory} lacks {', '.join(missing)}: pass the claims/<batch>/ "
                "folder 'certfleet factory claim create' wrote"
            )
        return cls(
            batch=directory.name,
            cert=directory / "claim.crt",
            key=directory / "claim.key",
            chain=directory / "chain.pem",
            root=directory / "root.crt",
        )

    def tls_context(self) -> ssl.SSLContext:
        """Trust our root, present the claim (:func:`fleetcore.tls.client_context`)."""
        try:
            return client_context(self.root, self.cert, self.key)
        except TlsSetupError as exc:
            raise BundleError(f"claim {self.batch}: {exc}") from None


@dataclass
class EnrollmentReport:
    """What a fleet's enrollment came to."""

    enrolled: list[DeviceBundle] = field(default_factory=list)
    #: hardware serial -> its one line
    refused: dict[str, str] = field(default_factory=dict)
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "enrolled": len(self.enrolled),
            "refused": len(self.refused),
            "refused_by_reason": dict(sorted(self.refused_by_reason.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "enrollments_per_s": (
                round(len(self.enrolled) / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0
            ),
        }


def hardware_serials(prefix: str, count: int, file: Path | None = None) -> list[str]:
    """The devices' hardware serials: one a line from ``file`` (``#`` comments and blanks
    skipped; the first ``count`` when given), else ``<prefix><index>`` for 1..count."""
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except OSError as exc:
            raise SimError(f"cannot read hardware serials from {file}: {exc}") from None
        serials = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
        serials = serials[:count] if count else serials
    else:
        serials = [f"{prefix}{index:06d}" for index in range(1, count + 1)]
    bad = [s for s in serials if not HARDWARE_SERIAL_PATTERN.fullmatch(s)]
    if bad:
        raise SimError(
            f"hardware serial {bad[0][:40]!r} is not 1-128 printable characters without spaces"
        )
    if not serials:
        raise SimError("no hardware serials: pass --devices N or a --serials file with lines")
    if len(set(serials)) != len(serials):
        raise SimError("the hardware serials name a device twice")
    return serials


def _csr_der(key: Any, hardware_serial: str) -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, hardware_serial)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _refusal(hardware_serial: str, response: httpx.Response) -> EstEnrollmentError:
    text = response.text[:300].strip().replace("\n", " ") or response.reason_phrase
    reason = {403: "forbidden", 409: "conflict", 401: "unauthorized", 429: "rate_limited"}.get(
        response.status_code, f"http_{response.status_code}"
    )
    return EstEnrollmentError(
        f"device {hardware_serial}: enrollment refused ({response.status_code}): {text}", reason
    )


def _request(est_url: str, context: ssl.SSLContext, serial: str, der: bytes) -> x509.Certificate:
    """One enrollment on its own TLS connection, as a device makes it."""
    try:
        with httpx.Client(verify=context, timeout=30) as client:
            response = client.post(
                est_url.rstrip("/") + EST_PATH,
                content=base64.encodebytes(der),
                headers={
                    "Content-Type": "application/pkcs10",
                    "Content-Transfer-Encoding": "base64",
                },
            )
    except httpx.HTTPError as exc:
        raise EstEnrollmentError(
            f"device {serial}: EST server {est_url} unreachable: {exc}", "unreachable"
        ) from None
    if response.status_code != 200:
        raise _refusal(serial, response)
    try:
        if len(response.content) > _MAX_ANSWER:
            raise ValueError("answer too large")
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))[0]
    except (ValueError, IndexError) as exc:
        raise EstEnrollmentError(
            f"device {serial}: the EST answer is not a certs-only PKCS#7 ({exc})", "bad_answer"
        ) from None


def _device_identity(certificate: x509.Certificate, serial: str) -> Identity:
    try:
        identity = read_identity(certificate)
    except IdentityError as exc:
        raise EstEnrollmentError(
            f"device {serial}: the issued certificate is not a device identity ({exc})",
            "bad_answer",
        ) from None
    if identity.kind is not IdentityKind.DEVICE:
        raise EstEnrollmentError(
            f"device {serial}: the issued certificate names {identity.uri}, not a device",
            "bad_answer",
        )
    return identity


@dataclass(frozen=True, slots=True)
class _Target:
    est_url: str
    context: ssl.SSLContext
    data_dir: Path
    broker: str
    chain_pem: bytes
    root_pem: bytes
    key_algorithm: str


def _enroll_one(target: _Target, serial: str) -> DeviceBundle:
    key = generate_key(target.key_algorithm)  # born on the device; never sent
    certificate = _request(target.est_url, target.context, serial, _csr_der(key, serial))
    identity = _device_identity(certificate, serial)
    device_id = identity.name
    final = target.data_dir / "devices" / device_id
    if final.exists():
        raise EstEnrollmentError(
            f"device {serial}: {final} exists already; use another --data-dir", "bundle_exists"
        )
    return write_enrolled_bundle(
        final,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=private_key_pem(key),
        chain_pem=target.chain_pem,
        root_pem=target.root_pem,
        info_json=bundle_info(
            device_id=device_id,
            hardware_serial=serial,
            serial=serial_hex(certificate.serial_number),
            identity=identity.uri,
            trust_domain=identity.trust_domain,
            not_before=certificate.not_valid_before_utc.isoformat(),
            not_after=certificate.not_valid_after_utc.isoformat(),
            broker=target.broker,
        ),
    )


def enroll_fleet(
    claim: ClaimCredentials,
    est_url: str,
    serials: Iterable[str],
    data_dir: Path,
    broker: str,
    *,
    concurrency: int = 16,
    key_algorithm: str = "p256",
    on_refused: Callable[[str], None] | None = None,
) -> EnrollmentReport:
    """Enroll one simulated device per hardware serial with ``claim``; bundles go to
    ``data_dir/devices/<device id>/``. At most ``concurrency`` enrollments in flight."""
    if not est_url.startswith("https://"):
        raise SimError(f"EST URL {est_url!r} must be https:// (the registry's HTTPS listener)")
    (data_dir / "devices").mkdir(parents=True, exist_ok=True)
    target = _Target(
        est_url,
        claim.tls_context(),
        data_dir,
        broker,
        claim.chain.read_bytes(),
        claim.root.read_bytes(),
        key_algorithm,
    )
    report = EnrollmentReport()
    started = time.monotonic()

    def one(serial: str) -> None:
        try:
            report.enrolled.append(_enroll_one(target, serial))
        except EstEnrollmentError as exc:
            report.refused[serial] = str(exc)
            report.refused_by_reason[exc.reason] += 1
            log.debug("est enrollment refused serial=%s reason=%s", serial, exc.reason)
            if on_refused is not None:  # the one line a person reads; the log keeps it quiet
                on_refused(str(exc))

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="est") as pool:
        list(pool.map(one, serials))
    report.elapsed_s = time.monotonic() - started
    report.enrolled.sort(key=lambda bundle: bundle.device_id)
    log.info(
        "est enrollment done enrolled=%d refused=%d pid=%d",
        len(report.enrolled),
        len(report.refused),
        os.getpid(),
    )
    return report
