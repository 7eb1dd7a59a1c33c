"""Certificate lifecycle: confirmed renewals, superseded certificates, feed event kinds.

``certificate.confirmed_at`` (the device connected with this certificate and said so),
``certificate.supersede_at`` (an older certificate's revocation as superseded is due then,
after the grace) and ``certificate.superseded_by``; ``revocation.kind`` (``decommission``,
the only kind before, or ``superseded``). Every existing row keeps its meaning.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("certificate") as batch:
        batch.add_column(sa.Column("confirmed_at", _TS, nullable=True))
        batch.add_column(sa.Column("supersede_at", _TS, nullable=True))
        batch.add_column(sa.Column("superseded_by", sa.String(48), nullable=True))
    op.create_index("ix_certificate_supersede_at", "certificate", ["supersede_at"])
    with op.batch_alter_table("revocation") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(16), nullable=False, server_default="decommission")
        )


def downgrade() -> None:
    with op.batch_alter_table("revocation") as batch:
        batch.drop_column("kind")
    op.drop_index("ix_certificate_supersede_at", table_name="certificate")
    with op.batch_alter_table("certificate") as batch:
        batch.drop_column("superseded_by")
        batch.drop_column("supersede_at")
        batch.drop_column("confirmed_at")
