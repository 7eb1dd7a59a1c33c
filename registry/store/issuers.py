"""Which issuing CA the fleet's live certificates come from (issue 26: rollover).

A certificate names its issuing CA by its Authority Key Identifier (the issuer's key id,
:func:`factory.issuers.authority_key_id`). Read from the stored PEMs of live, unexpired
certificates: used by the expiry report (devices per issuing CA), ``certfleet ca issuers``
and ``certfleet ca retire`` (an issuing CA is retired only when none of its certificates is
live).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from cryptography import x509
from sqlmodel import Session, col, select

from factory.issuers import authority_key_id
from registry.models import Certificate, Device

__all__ = ["IssuerUse", "issuer_use"]


@dataclass
class IssuerUse:
    """Per issuing CA key id: live certificates, and active devices whose newest live
    certificate it signed (where the device *is*)."""

    certificates: Counter[str] = field(default_factory=Counter)
    devices: Counter[str] = field(default_factory=Counter)


def issuer_use(session: Session, now: dt.datetime) -> IssuerUse:
    """Count live, unexpired certificates and active devices by issuing CA."""
    rows = session.exec(
        select(Certificate.device_id, Certificate.not_after, Certificate.certificate_pem)
        .join(Device, col(Device.device_id) == col(Certificate.device_id))
        .where(col(Certificate.status) == "live")
        .where(col(Certificate.not_after) > now)
        .where(col(Device.status) == "active")
    ).all()
    use = IssuerUse()
    newest: dict[str, tuple[dt.datetime, str]] = {}
    for device_id, not_after, pem in rows:
        try:
            key_id = authority_key_id(x509.load_pem_x509_certificate(pem.encode())) or "unknown"
        except ValueError:
            key_id = "unknown"
        use.certificates[key_id] += 1
        seen = newest.get(device_id)
        if seen is None or not_after > seen[0]:
            newest[device_id] = (not_after, key_id)
    use.devices.update(key_id for _, key_id in newest.values())
    return use
