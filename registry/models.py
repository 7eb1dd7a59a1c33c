"""Registry tables (SQLModel) and the API's request/response shapes, side by side.

Serials are stored as :func:`fleetcore.profile.serial_hex` strings: the one serial format used
by the registry, the feed, the broker and the manifest. Times are timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Column, DateTime, Index, String, Text, TypeDecorator, text
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from fleetcore.profile import HARDWARE_SERIAL_PATTERN as _HARDWARE_SERIAL
from fleetcore.profile import NAME_PATTERN
from fleetcore.reasons import DEFAULT_REASON_CODE, ReasonCode
from fleetcore.registration_wire import MAX_BATCH

__all__ = [
    "HARDWARE_SERIAL_PATTERN",
    "MAX_BATCH",
    "ApiToken",
    "AuditLog",
    "BatchRegistration",
    "BatchResult",
    "Certificate",
    "CertificatePublic",
    "ConsoleSession",
    "ConsoleSigninFailure",
    "Counter",
    "DecommissionRequest",
    "DecommissionResult",
    "Device",
    "DeviceList",
    "DevicePublic",
    "DeviceRegistration",
    "DeviceStatus",
    "DeviceSummary",
    "ExpiringDevice",
    "ExpiryReport",
    "ReenrollRequest",
    "ReenrollResult",
    "HistogramBin",
    "Revocation",
    "RenewalClaim",
    "RenewalLimit",
    "Stats",
    "TokenInfo",
    "WeekCount",
]

DEVICE_ID_PATTERN = NAME_PATTERN.pattern
HARDWARE_SERIAL_PATTERN = _HARDWARE_SERIAL.pattern

DeviceStatus = Literal["active", "decommissioned"]
CertificateStatus = Literal["live", "revoked"]


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# -- tables ----------------------------------------------------------------------------------


class Device(SQLModel, table=True):
    __tablename__ = "device"
    #: (status, device_id): a status-filtered page is an index range, no sort.
    __table_args__ = (Index("ix_device_status_device_id", "status", "device_id"),)

    device_id: str = Field(primary_key=True, max_length=64)
    status: str = Field(default="active", max_length=16)
    hardware_serial: str | None = Field(default=None, max_length=128, unique=True)
    created_at: dt.datetime = Field(sa_type=UTCDateTime)
    decommissioned_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_seen_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_telemetry: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


#: The condition of the partial index of revoked certificates (queries that use it say it
#: literally: a planner matches a partial index's condition against the query's text).
REVOKED_ONLY = "status = 'revoked'"


class Certificate(SQLModel, table=True):
    __tablename__ = "certificate"
    __table_args__ = (
        Index("ix_certificate_status_not_after", "status", "not_after"),
        # the feed snapshot's pages: revoked serials in order, from the index alone
        # (partial: registering a certificate does not pay for it; migration 0011)
        Index(
            "ix_certificate_revoked_serial",
            "serial",
            "not_after",
            "status",
            sqlite_where=text(REVOKED_ONLY),
            postgresql_where=text(REVOKED_ONLY),
        ),
    )

    serial: str = Field(primary_key=True, max_length=48)
    device_id: str = Field(foreign_key="device.device_id", index=True, max_length=64)
    not_before: dt.datetime = Field(sa_type=UTCDateTime)
    not_after: dt.datetime = Field(sa_type=UTCDateTime, index=True)
    status: str = Field(default="live", max_length=16)
    revoked_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: RFC 5280 reason name (:mod:`fleetcore.reasons`) once revoked: the CRL entry and OCSP.
    revocation_reason: str | None = Field(default=None, max_length=32)
    certificate_pem: str = Field(sa_column=Column(Text, nullable=False))
    #: when the device confirmed over MQTT that it connected with this certificate.
    confirmed_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: when this (older) certificate is to be revoked as superseded (after the grace).
    supersede_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    #: the confirmed certificate that supersedes this one.
    superseded_by: str | None = Field(default=None, max_length=48)


class Revocation(SQLModel, table=True):
    """One event of the revocation feed; ``seq`` is gap-free (allocated under a lock)."""

    __tablename__ = "revocation"

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    device_id: str = Field(max_length=64, index=True)
    serials: list[str] = Field(sa_column=Column(JSON, nullable=False))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    reason_code: str = Field(
        default=DEFAULT_REASON_CODE,
        sa_column=Column(String(32), nullable=False, server_default=DEFAULT_REASON_CODE),
    )
    revoked_at: dt.datetime = Field(sa_type=UTCDateTime)
    operator: str = Field(max_length=256)
    #: ``decommission`` or ``superseded`` (:mod:`fleetcore.revocation_feed`).
    kind: str = Field(
        default="decommission",
        sa_column=Column(String(16), nullable=False, server_default="decommission"),
    )


class Counter(SQLModel, table=True):
    """Named counters (``revocation_seq``, ``crl_number``) locked with SELECT ... FOR UPDATE."""

    __tablename__ = "counter"

    name: str = Field(primary_key=True, max_length=32)
    value: int = Field(default=0)


class RenewalLimit(SQLModel, table=True):
    """Per-device renewal rate limit, in the database so that a restart or a second
    registry process keeps it: attempts (bad CSRs too) in the current window, and the last
    certificate issued (a re-delivered CSR with the same key gets it again)."""

    __tablename__ = "renewal_limit"

    device_id: str = Field(primary_key=True, max_length=64)
    window_start: dt.datetime = Field(sa_type=UTCDateTime)
    attempts: int = Field(default=0)
    issued_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    issued_serial: str | None = Field(default=None, max_length=48)
    issued_key_sha256: str | None = Field(default=None, max_length=64)


class RenewalClaim(SQLModel, table=True):
    """Which registry replica answers one renewal request: every replica's MQTT client
    receives it, the first to insert its fingerprint (device id + SHA-256 of the CSR) answers,
    the others stay silent (shared consumption). The claimant answers a re-delivery of the
    same request again; another replica takes a claim over once it is ``CLAIM_TTL`` old."""

    __tablename__ = "renewal_claim"

    fingerprint: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(max_length=64, index=True)
    instance: str = Field(max_length=64)
    claimed_at: dt.datetime = Field(sa_type=UTCDateTime)


class AuditLog(SQLModel, table=True):
    """Every operator action: who, what, on what, when, from where."""

    __tablename__ = "audit_log"
    #: (target, at): a device's history (the console's device page) is an index range.
    __table_args__ = (Index("ix_audit_log_target_at", "target", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    who: str = Field(max_length=256)
    action: str = Field(max_length=64, index=True)
    target: str = Field(max_length=256)
    at: dt.datetime = Field(sa_type=UTCDateTime, index=True)
    from_addr: str | None = Field(default=None, max_length=64)
    #: the client address a trusted proxy forwarded (X-Forwarded-For); from_addr is the peer.
    forwarded_for: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class ApiToken(SQLModel, table=True):
    """An operator bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    operator: str = Field(max_length=64, index=True)
    token_sha256: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    created_at: dt.datetime = Field(sa_type=UTCDateTime)
    revoked: bool = Field(default=False)
    revoked_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: viewer, operator or admin (fleetcore.profile.OperatorRole); NULL (a token made before
    #: roles existed) acts as operator.
    role: str | None = Field(default=None, max_length=16)


class ConsoleSession(SQLModel, table=True):
    """One signed-in operator of the web console; only the cookie's SHA-256 is stored."""

    __tablename__ = "console_session"

    id_sha256: str = Field(sa_column=Column(String(64), primary_key=True))
    operator: str = Field(max_length=64)
    #: how the operator signed in: ``token`` (bearer token) or ``mtls`` (client certificate).
    via: str = Field(max_length=8)
    #: the bearer token signed in with: revoking it ends the session at once.
    token_id: int | None = Field(default=None)
    csrf_token: str = Field(max_length=64)
    created_at: dt.datetime = Field(sa_type=UTCDateTime)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime, index=True)
    from_addr: str | None = Field(default=None, max_length=64)
    #: the role of the certificate signed in with (a token session follows its token's role).
    role: str | None = Field(default=None, max_length=16)


class ConsoleSigninFailure(SQLModel, table=True):
    """A failed console sign-in, counted per client address to rate-limit guessing."""

    __tablename__ = "console_signin_failure"
    __table_args__ = (Index("ix_console_signin_failure_client_at", "client", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    client: str = Field(max_length=64)
    at: dt.datetime = Field(sa_type=UTCDateTime)


# -- API shapes -------------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid")


class DeviceRegistration(BaseModel):
    model_config = _STRICT

    certificate_pem: str = PydanticField(
        min_length=1, max_length=16_384, description="the device's leaf certificate, PEM"
    )
    hardware_serial: str | None = PydanticField(default=None, pattern=HARDWARE_SERIAL_PATTERN)


class BatchRegistration(BaseModel):
    model_config = _STRICT

    devices: list[DeviceRegistration] = PydanticField(min_length=1, max_length=MAX_BATCH)


class BatchResult(BaseModel):
    created: int
    existing: int


class CertificatePublic(BaseModel):
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    status: CertificateStatus
    revoked_at: dt.datetime | None
    revocation_reason: ReasonCode | None = None


class DeviceSummary(BaseModel):
    device_id: str
    status: DeviceStatus
    hardware_serial: str | None
    created_at: dt.datetime
    decommissioned_at: dt.datetime | None
    last_seen_at: dt.datetime | None
    last_telemetry: dict[str, Any] | None


class DevicePublic(DeviceSummary):
    certificates: list[CertificatePublic]


class DecommissionResult(DevicePublic):
    revocation_seq: int


class DeviceList(BaseModel):
    devices: list[DeviceSummary]
    next_cursor: str | None


class DecommissionRequest(BaseModel):
    model_config = _STRICT

    reason: str = PydanticField(min_length=1, max_length=500)
    reason_code: ReasonCode = PydanticField(
        default=DEFAULT_REASON_CODE,
        description="RFC 5280 CRLReason name, carried into the feed, the CRL entry and OCSP",
    )


class ReenrollRequest(BaseModel):
    model_config = _STRICT

    csr_pem: str = PydanticField(
        min_length=1,
        max_length=16_384,
        description="the device's CSR, PEM (its key generated on the device)",
    )


class ReenrollResult(BaseModel):
    """The certificate a re-enrollment issued, with the chain a device presents beside it."""

    device_id: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    previous_serial: str | None
    #: True when this is the certificate an earlier re-enrollment of the same key issued.
    repeated: bool = False
    certificate_pem: str
    chain_pem: str = PydanticField(description="issuing CA + root, PEM")


class TokenInfo(BaseModel):
    """What ``certfleet registry token list`` shows of a token: never the token or its hash."""

    id: int
    operator: str
    role: str
    created_at: dt.datetime
    revoked: bool
    revoked_at: dt.datetime | None


class WeekCount(BaseModel):
    week_start: dt.date
    count: int


class HistogramBin(BaseModel):
    start: dt.datetime
    end: dt.datetime
    count: int


class ExpiringDevice(BaseModel):
    device_id: str
    #: the latest not_after of its live certificates (None: it has no live certificate)
    not_after: dt.datetime | None


class ExpiryReport(BaseModel):
    """``GET /api/v1/expiry``: the fleet's expiry over the current certificates of active
    devices. ``buckets`` are disjoint: expired (or no live certificate), <7d, <30d, <90d,
    later."""

    generated_at: dt.datetime
    active_devices: int
    buckets: dict[str, int]
    next_expiry: dt.datetime | None
    histogram: list[HistogramBin]
    expired: list[ExpiringDevice]
    soonest: list[ExpiringDevice]
    #: active devices per issuing CA (key id of the CA that signed their newest live
    #: certificate): after a rollover, who is still on the old one (issue 26).
    by_issuer: dict[str, int] = PydanticField(default_factory=dict)


class RenewNowRequest(BaseModel):
    """``POST /api/v1/devices/renew-now``: the devices to renew at once, by id, or all the
    active devices on one issuing CA (its key id, or 8+ hex digits of it)."""

    device_ids: list[Annotated[str, PydanticField(pattern=DEVICE_ID_PATTERN, max_length=64)]] = (
        PydanticField(default_factory=list, max_length=100_000)
    )
    issuer: str | None = PydanticField(
        default=None, pattern=r"^[0-9A-Fa-f:]{8,95}$", description="issuing CA key id (prefix)"
    )


class RenewNowResult(BaseModel):
    requested: int
    #: the device ids asked (at most 1,000 listed)
    device_ids: list[str]
    #: ids given that are no active device (not asked)
    not_active: list[str]


class Stats(BaseModel):
    devices_by_status: dict[str, int]
    expiries_per_week: list[WeekCount]
    seen_last_minute: int


# The enrollment tables (claims, allow-lists, enrollment secrets) live beside EST, in the
# same metadata: imported here so that whoever loads the models loads them all.
from registry.est import models as _enrollment_models  # noqa: E402, F401
