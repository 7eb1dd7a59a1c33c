"""Hardening: revocation reason codes (feed, CRL, OCSP) and the renewal rate limit table.

- ``revocation.reason_code``: the RFC 5280 reason of a decommission (existing rows:
  ``cessationOfOperation``, what a decommission meant before reason codes existed);
- ``certificate.revocation_reason``: the same, per revoked certificate (CRL entry, OCSP);
- ``renewal_limit``: the renewal rate limit per device, shared by every registry process
  and kept across restarts (it lived in process memory).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_DEFAULT_REASON = "cessationOfOperation"


def upgrade() -> None:
    with op.batch_alter_table("revocation") as batch:
        batch.add_column(
            sa.Column("reason_code", sa.String(32), nullable=False, server_default=_DEFAULT_REASON)
        )
    with op.batch_alter_table("certificate") as batch:
        batch.add_column(sa.Column("revocation_reason", sa.String(32), nullable=True))
    op.execute(
        sa.text(
            "UPDATE certificate SET revocation_reason = :reason WHERE status = 'revoked'"
        ).bindparams(reason=_DEFAULT_REASON)
    )
    op.create_table(
        "renewal_limit",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("window_start", _TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("issued_at", _TS, nullable=True),
        sa.Column("issued_serial", sa.String(48), nullable=True),
        sa.Column("issued_key_sha256", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("renewal_limit")
    with op.batch_alter_table("certificate") as batch:
        batch.drop_column("revocation_reason")
    with op.batch_alter_table("revocation") as batch:
        batch.drop_column("reason_code")
