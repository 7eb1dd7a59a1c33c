"""Initial registry schema: devices, certificates, revocation feed, counters, audit, tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "device",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("hardware_serial", sa.String(128), nullable=True, unique=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("decommissioned_at", _TS, nullable=True),
        sa.Column("last_seen_at", _TS, nullable=True),
        sa.Column("last_telemetry", sa.JSON(), nullable=True),
    )
    op.create_index("ix_device_status_device_id", "device", ["status", "device_id"])
    op.create_table(
        "certificate",
        sa.Column("serial", sa.String(48), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("device.device_id"), nullable=False),
        sa.Column("not_before", _TS, nullable=False),
        sa.Column("not_after", _TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
    )
    op.create_index("ix_certificate_device_id", "certificate", ["device_id"])
    op.create_index("ix_certificate_not_after", "certificate", ["not_after"])
    op.create_index("ix_certificate_status_not_after", "certificate", ["status", "not_after"])
    op.create_table(
        "revocation",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("serials", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revoked_at", _TS, nullable=False),
        sa.Column("operator", sa.String(256), nullable=False),
    )
    op.create_index("ix_revocation_device_id", "revocation", ["device_id"])
    counter = op.create_table(
        "counter",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.Integer(), nullable=False),
    )
    op.bulk_insert(
        counter, [{"name": "revocation_seq", "value": 0}, {"name": "crl_number", "value": 0}]
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("who", sa.String(256), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("from_addr", sa.String(64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
    )
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("operator", sa.String(64), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_api_token_operator", "api_token", ["operator"])


def downgrade() -> None:
    for table in ("api_token", "audit_log", "counter", "revocation", "certificate", "device"):
        op.drop_table(table)
