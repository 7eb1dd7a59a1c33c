"""Sign one device-generated CSR into the fleet (``certfleet factory sign-csr``).

The CSR passes the factory's checks (:mod:`factory.csr`); under the provisioning lock the
manifest is repaired and must not yet list the device (a device with a certificate renews
through the registry); the certificate gets the validity policy's dates
(:func:`fleetcore.validity.new_validity`, the stagger offset from the device id: a single CSR
has no batch rank), is written to ``out`` when given, and its manifest line is appended.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from factory.ca import CertificateAuthority
from factory.csr import load_csr, validate_device_csr
from factory.errors import CSRError
from factory.manifest import Manifest, ManifestRecord
from factory.provision import ProvisionLock, new_batch_id
from fleetcore.clock import utcnow
from fleetcore.layout import write_public
from fleetcore.profile import Identity
from fleetcore.stagger import stagger_fraction_for_id
from fleetcore.validity import new_validity

__all__ = ["SignedCSR", "read_csr_file", "sign_csr"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SignedCSR:
    """The identity a CSR was signed for and the manifest line written for it."""

    identity: Identity
    record: ManifestRecord


def read_csr_file(path: Path) -> bytes:
    """The bytes of the CSR file at ``path``; CSRError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CSRError(f"cannot read CSR {path}: {exc.strerror}") from None


def sign_csr(
    ca: CertificateAuthority,
    csr_bytes: bytes,
    *,
    lifetime: dt.timedelta,
    stagger: dt.timedelta,
    hardware_serial: str | None = None,
    out: Path | None = None,
) -> SignedCSR:
    """Check, sign and record one device CSR; CSRError when it is refused (module doc)."""
    validated = validate_device_csr(load_csr(csr_bytes), ca.trust_domain)
    device_id = validated.identity.name
    layout = ca.layout
    with ProvisionLock(layout.provision_lock):
        manifest = Manifest(layout.manifest)
        manifest.repair()
        existing = manifest.serials_by_device().get(device_id)
        if existing:
            raise CSRError(
                f"device {device_id} already has certificate serial {existing[-1]} in the "
                "manifest: a device with a valid certificate renews itself over MQTT, and one "
                "whose certificates have all expired is re-enrolled by an operator "
                f"(certfleet registry devices reenroll {device_id} --csr FILE)"
            )
        now = utcnow()
        validity = new_validity(
            now, lifetime, stagger=stagger, fraction=stagger_fraction_for_id(device_id)
        )
        issued = ca.issue_client(
            validated.identity,
            public_key=validated.public_key,
            not_before=validity.not_before,
            not_after=validity.not_after,
        )
        record = ManifestRecord.from_certificate(
            issued.certificate,
            device_id=device_id,
            hardware_serial=hardware_serial,
            issued_at=now,
            batch_id=f"csr-{new_batch_id()}",
        )
        if out is not None:
            write_public(out, issued.certificate_pem)
        with manifest.writer() as writer:
            writer.append(record.to_line())
    log.info("csr signed device_id=%s serial=%s", device_id, record.serial)
    return SignedCSR(validated.identity, record)
