"""The web console: signed-in sessions, failed sign-ins (rate limit), a device's audit history.

Both console tables live in the database, not in a process: a session survives a restart and
is valid on every registry process of the same database, and the sign-in rate limit counts
failures against all of them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "console_session",
        sa.Column("id_sha256", sa.String(64), primary_key=True),
        sa.Column("operator", sa.String(64), nullable=False),
        sa.Column("via", sa.String(8), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("from_addr", sa.String(64), nullable=True),
    )
    op.create_index("ix_console_session_expires_at", "console_session", ["expires_at"])
    op.create_table(
        "console_signin_failure",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("at", _TS, nullable=False),
    )
    op.create_index(
        "ix_console_signin_failure_client_at", "console_signin_failure", ["client", "at"]
    )
    op.create_index("ix_audit_log_target_at", "audit_log", ["target", "at"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_target_at", table_name="audit_log")
    op.drop_index("ix_console_signin_failure_client_at", table_name="console_signin_failure")
    op.drop_table("console_signin_failure")
    op.drop_index("ix_console_session_expires_at", table_name="console_session")
    op.drop_table("console_session")
