"""Tables of zero-touch enrollment: claims, their allow-lists, one-time enrollment secrets.

A claim is a production batch's bootstrap certificate (``spiffe://<td>/claim/<batch>``) with
a quota, an expiry and, optionally, an allow-list; ``enrolled`` counts the devices enrolled
with it and is raised only by a conditional UPDATE (``enrolled < quota``), so concurrent
enrollments on SQLite or PostgreSQL never exceed the quota. Migration 0007; a claim's own
pre-enrollment webhook URL, migration 0010.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import AfterValidator, BaseModel
from pydantic import Field as PydanticField
from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from fleetcore.errors import ConfigError
from fleetcore.webhooks import MAX_WEBHOOK_URL, check_webhook_url
from registry.models import DEVICE_ID_PATTERN, HARDWARE_SERIAL_PATTERN, UTCDateTime

__all__ = [
    "MAX_ALLOW_PER_REQUEST",
    "Claim",
    "ClaimAllow",
    "ClaimAllowEntry",
    "ClaimPublic",
    "ClaimRegistration",
    "ClaimRevokeRequest",
    "EnrollmentSecret",
]

#: Allow-list entries in one ``POST /claims`` (a bigger batch is split by the factory).
MAX_ALLOW_PER_REQUEST = 100_000


class Claim(SQLModel, table=True):
    __tablename__ = "claim"

    batch: str = Field(primary_key=True, max_length=64)
    serial: str = Field(max_length=48, unique=True)
    quota: int
    enrolled: int = Field(default=0)
    #: no allow-list: any device id may enroll (up to the quota).
    allow_any: bool = Field(default=False)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime)
    created_at: dt.datetime = Field(sa_type=UTCDateTime)
    revoked_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    certificate_pem: str = Field(sa_column=Column(Text, nullable=False))
    #: the claim's own pre-enrollment webhook (:mod:`fleetcore.webhooks`); migration 0010.
    webhook_url: str | None = Field(default=None, max_length=MAX_WEBHOOK_URL)


class ClaimAllow(SQLModel, table=True):
    """One allow-list entry: a device id, bound to a hardware serial when the line gave one."""

    __tablename__ = "claim_allow"
    __table_args__ = (
        UniqueConstraint("batch", "device_id", name="uq_claim_allow_batch_device"),
        Index("ix_claim_allow_batch_hardware_serial", "batch", "hardware_serial", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    batch: str = Field(foreign_key="claim.batch", max_length=64)
    device_id: str = Field(max_length=64)
    hardware_serial: str | None = Field(default=None, max_length=128)
    enrolled_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)


class EnrollmentSecret(SQLModel, table=True):
    """A one-time enrollment secret bound to a device id; only its SHA-256 is stored."""

    __tablename__ = "enrollment_secret"

    id: int | None = Field(default=None, primary_key=True)
    secret_sha256: str = Field(max_length=64, unique=True)
    device_id: str = Field(max_length=64, index=True)
    created_at: dt.datetime = Field(sa_type=UTCDateTime)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime)
    used_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_by: str = Field(max_length=256)


# -- API shapes ---------------------------------------------------------------------------


class ClaimAllowEntry(BaseModel):
    device_id: str = PydanticField(pattern=DEVICE_ID_PATTERN, max_length=64)
    hardware_serial: str | None = PydanticField(default=None, pattern=HARDWARE_SERIAL_PATTERN)


def _webhook_url(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        return check_webhook_url(url)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


WebhookUrl = Annotated[str | None, AfterValidator(_webhook_url)]


class ClaimRegistration(BaseModel):
    """What the factory records about a claim (``POST /api/v1/claims``)."""

    batch: str = PydanticField(pattern=DEVICE_ID_PATTERN, max_length=64)
    serial: str = PydanticField(pattern=r"^[0-9a-f]{1,48}$")
    quota: int = PydanticField(ge=1, le=10_000_000)
    expires_at: dt.datetime
    certificate_pem: str = PydanticField(max_length=16_384)
    allow: list[ClaimAllowEntry] = PydanticField(
        default_factory=list, max_length=MAX_ALLOW_PER_REQUEST
    )
    #: asked before each enrollment with this claim (beside the registry-wide webhook).
    webhook_url: WebhookUrl = PydanticField(default=None, max_length=MAX_WEBHOOK_URL)


class ClaimRevokeRequest(BaseModel):
    reason: str = PydanticField(default="revoked by an operator", max_length=500)


class ClaimPublic(BaseModel):
    batch: str
    serial: str
    quota: int
    enrolled: int
    allow_any: bool
    allow_count: int
    expires_at: dt.datetime
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    webhook_url: str | None = None
