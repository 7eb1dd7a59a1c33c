"""Operator roles (issue 26): ``api_token.role`` and ``console_session.role``.

NULL in either means a token or session made before roles existed: it acts as ``operator``,
what it could do before (fleetcore.profile.DEFAULT_OPERATOR_ROLE).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_token") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=True))
    with op.batch_alter_table("console_session") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("console_session") as batch:
        batch.drop_column("role")
    with op.batch_alter_table("api_token") as batch:
        batch.drop_column("role")
