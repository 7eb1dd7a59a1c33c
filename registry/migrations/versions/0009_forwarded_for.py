"""The audit log records what a trusted reverse proxy said the client was, beside the peer.

``audit_log.forwarded_for``: the client address from ``X-Forwarded-For`` when the socket
peer is one of ``CERTFLEET_REGISTRY_TRUSTED_PROXIES``; ``from_addr`` stays the socket peer.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("forwarded_for", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("forwarded_for")
