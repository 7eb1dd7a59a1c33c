"""Zero-touch enrollment: claims (a batch's bootstrap certificate, quota, expiry), their
allow-lists, and one-time enrollment secrets (only their SHA-256) for EST simpleenroll.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "claim",
        sa.Column("batch", sa.String(64), primary_key=True),
        sa.Column("serial", sa.String(48), nullable=False, unique=True),
        sa.Column("quota", sa.Integer, nullable=False),
        sa.Column("enrolled", sa.Integer, nullable=False, server_default="0"),
        sa.Column("allow_any", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.Column("certificate_pem", sa.Text, nullable=False),
    )
    op.create_table(
        "claim_allow",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("batch", sa.String(64), sa.ForeignKey("claim.batch"), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("hardware_serial", sa.String(128), nullable=True),
        sa.Column("enrolled_at", _TS, nullable=True),
        sa.UniqueConstraint("batch", "device_id", name="uq_claim_allow_batch_device"),
    )
    op.create_index(
        "ix_claim_allow_batch_hardware_serial",
        "claim_allow",
        ["batch", "hardware_serial"],
        unique=True,
    )
    op.create_table(
        "enrollment_secret",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("used_at", _TS, nullable=True),
        sa.Column("created_by", sa.String(256), nullable=False),
    )
    op.create_index("ix_enrollment_secret_device_id", "enrollment_secret", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_enrollment_secret_device_id", table_name="enrollment_secret")
    op.drop_table("enrollment_secret")
    op.drop_index("ix_claim_allow_batch_hardware_serial", table_name="claim_allow")
    op.drop_table("claim_allow")
    op.drop_table("claim")
