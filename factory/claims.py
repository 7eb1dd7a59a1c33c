"""Claim (bootstrap) certificates for zero-touch enrollment of a production batch.

``certfleet factory claim create --batch NAME --quota N --expires DURATION [--allow-file F]``
mints ``spiffe://<td>/claim/<NAME>`` (:mod:`fleetcore.profile`: no device identity, first
enrollment only) into ``claims/<NAME>/`` (``claim.crt``, ``claim.key`` 0600, ``chain.pem``,
``root.crt``, ``claim.json``) and records the claim (batch, serial, quota, expiry, allow-list)
in the registry over REST (``POST /api/v1/claims``), as ``factory provision`` registers
devices. Without a registry URL the record stays in ``claim.json`` for
``certfleet registry claims import``.

The allow-list file names who may enroll with the claim, one entry a line (``#`` comments
and blank lines skipped):

- ``DEVICE_ID``: that device id;
- ``DEVICE_ID,HARDWARE_SERIAL``: that device id, bound to that hardware serial (a CSR may
  ask for either);
- ``,HARDWARE_SERIAL``: that hardware serial; the device's id is the serial itself (it must
  then be a valid device id);
- a JSON object with ``device_id`` and/or ``hardware_serial`` (a factory manifest line).

Without an allow-list every device id may enroll, up to the quota.

``--webhook URL`` gives the claim its own pre-enrollment webhook: the registry asks it
before each enrollment with the claim (after the allow-list, beside the registry-wide
webhook; every webhook asked must allow). The URL is ``https://`` (plain ``http://`` only to
a loopback address), without credentials: :mod:`fleetcore.webhooks`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from factory.ca import CertificateAuthority, IssuedCertificate, write_issued
from factory.errors import ProvisionError, RegistrationError
from factory.registration import RegistryClient, refusal_detail
from fleetcore.clock import utcnow
from fleetcore.errors import ConfigError, IdentityError
from fleetcore.layout import DataLayout, write_public
from fleetcore.profile import (
    HARDWARE_SERIAL_PATTERN,
    Identity,
    check_device_id,
    check_name,
    serial_hex,
)
from fleetcore.webhooks import check_webhook_url

__all__ = [
    "MAX_ALLOW_ENTRIES",
    "MAX_QUOTA",
    "AllowEntry",
    "ClaimRecord",
    "claim_dir",
    "mint_claim",
    "read_allow_file",
    "register_claim",
    "write_claim",
]

MAX_QUOTA = 10_000_000
MAX_ALLOW_ENTRIES = 1_000_000


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """Who may enroll: a device id, a hardware serial, or both bound together."""

    device_id: str
    hardware_serial: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"device_id": self.device_id, "hardware_serial": self.hardware_serial}


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """What the registry records about a claim."""

    batch: str
    serial: str
    quota: int
    expires_at: dt.datetime
    allow: list[AllowEntry]
    certificate_pem: str
    #: the claim's own pre-enrollment webhook (:mod:`fleetcore.webhooks`), if any.
    webhook_url: str | None = None

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "batch": self.batch,
            "serial": self.serial,
            "quota": self.quota,
            "expires_at": self.expires_at.isoformat(),
            "certificate_pem": self.certificate_pem,
            "allow": [entry.as_dict() for entry in self.allow],
        }
        if self.webhook_url is not None:
            record["webhook_url"] = self.webhook_url
        return record


def claim_dir(layout: DataLayout, batch: str) -> Path:
    return layout.root / "claims" / batch


def _entry(device_id: str | None, hardware_serial: str | None, where: str) -> AllowEntry:
    device_id = (device_id or "").strip() or None
    hardware_serial = (hardware_serial or "").strip() or None
    if hardware_serial is not None and not HARDWARE_SERIAL_PATTERN.fullmatch(hardware_serial):
        raise ProvisionError(
            f"{where}: hardware serial {hardware_serial[:40]!r} is not 1-128 printable "
            "characters without spaces"
        )
    if device_id is None:
        if hardware_serial is None:
            raise ProvisionError(f"{where}: names neither a device id nor a hardware serial")
        device_id = hardware_serial  # a serial-only entry: the device is named by its serial
    try:
        check_device_id(device_id)
    except IdentityError as exc:
        hint = " (bind the serial to a device id: DEVICE_ID,SERIAL)" if hardware_serial else ""
        raise ProvisionError(f"{where}: {exc}{hint}") from None
    return AllowEntry(device_id, hardware_serial)


def read_allow_file(path: Path) -> list[AllowEntry]:
    """The allow-list in ``path`` (module doc); ProvisionError naming the bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvisionError(f"cannot read allow-list {path}: {exc}") from None
    entries: list[AllowEntry] = []
    device_ids: set[str] = set()
    serials: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ProvisionError(f"{where}: not a JSON object: {exc}") from None
            entry = _entry(item.get("device_id"), item.get("hardware_serial"), where)
        else:
            device_id, _, hardware_serial = line.partition(",")
            entry = _entry(device_id, hardware_serial, where)
        if entry.device_id in device_ids or (entry.hardware_serial in serials):
            raise ProvisionError(f"{where}: {entry.device_id} or its serial is listed twice")
        device_ids.add(entry.device_id)
        if entry.hardware_serial:
            serials.add(entry.hardware_serial)
        entries.append(entry)
        if len(entries) > MAX_ALLOW_ENTRIES:
            raise ProvisionError(f"{path}: more than {MAX_ALLOW_ENTRIES} entries")
    if not entries:
        raise ProvisionError(f"allow-list {path} names no device; drop --allow-file to allow any")
    return entries


def mint_claim(
    ca: CertificateAuthority,
    batch: str,
    *,
    quota: int,
    lifetime: dt.timedelta,
    allow: list[AllowEntry],
    webhook_url: str | None = None,
) -> tuple[IssuedCertificate, ClaimRecord]:
    """Issue batch ``batch``'s claim certificate (valid until the claim expires) and its
    record (with ``webhook_url``, checked by :func:`fleetcore.webhooks.check_webhook_url`,
    asked before each enrollment with it); nothing is written."""
    check_name(batch, "batch name")
    if not 1 <= quota <= MAX_QUOTA:
        raise ProvisionError(f"--quota {quota} must be between 1 and {MAX_QUOTA}")
    if webhook_url is not None:
        try:
            check_webhook_url(webhook_url)
        except ConfigError as exc:
            raise ProvisionError(f"--webhook: {exc}") from None
    expires_at = utcnow() + lifetime
    issued = ca.issue_client(Identity.claim(ca.trust_domain, batch), not_after=expires_at)
    certificate = issued.certificate
    record = ClaimRecord(
        batch=batch,
        serial=serial_hex(certificate.serial_number),
        quota=quota,
        expires_at=certificate.not_valid_after_utc,
        allow=allow,
        certificate_pem=issued.certificate_pem.decode(),
        webhook_url=webhook_url,
    )
    return issued, record


def write_claim(
    layout: DataLayout, ca: CertificateAuthority, issued: IssuedCertificate, record: ClaimRecord
) -> Path:
    """Write the claim's files into ``claims/<batch>/`` (key 0600); returns the folder."""
    folder = claim_dir(layout, record.batch)
    write_issued(issued, folder / "claim.crt", folder / "claim.key")
    write_public(folder / "chain.pem", ca.chain_pem)
    write_public(folder / "root.crt", ca.root_cert.public_bytes(serialization.Encoding.PEM))
    write_public(folder / "claim.json", json.dumps(record.as_json(), indent=2).encode())
    return folder


def register_claim(client: RegistryClient, record: ClaimRecord) -> bool:
    """Record the claim in the registry (``POST /api/v1/claims``); True when new, False when
    the same claim was recorded before. RegistrationError when refused."""
    response = client.send("POST", "/claims", json=record.as_json())
    if response.status_code in (200, 201):
        return response.status_code == 201
    detail = refusal_detail(response)
    raise RegistrationError(
        f"registry refused claim {record.batch} (HTTP {response.status_code}): {detail}; "
        "nothing was written"
    )
