"""A claim may name its own pre-enrollment webhook.

``claim.webhook_url``: asked before each first enrollment with the claim (beside the
registry-wide ``CERTFLEET_REGISTRY_EST_WEBHOOK_URL``); the rule for it is
:func:`fleetcore.webhooks.check_webhook_url`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("claim") as batch:
        batch.add_column(sa.Column("webhook_url", sa.String(2048), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("claim") as batch:
        batch.drop_column("webhook_url")
