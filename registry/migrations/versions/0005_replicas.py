"""Registry replicas: which replica answers a renewal request (shared consumption).

Two registry processes on one PostgreSQL database both receive every renewal request over
MQTT; the first to insert the request's fingerprint into ``renewal_claim`` answers it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "renewal_claim",
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_renewal_claim_device_id", "renewal_claim", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_renewal_claim_device_id", table_name="renewal_claim")
    op.drop_table("renewal_claim")
