"""Webhooks, idempotency keys, tenants' webhook secrets, and expiry bookkeeping.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as t:
        t.add_column(sa.Column("webhook_url", sa.String(2000)))
        t.add_column(sa.Column("webhook_events", sa.JSON))
        t.add_column(sa.Column("retry_of", sa.String(64)))
    with op.batch_alter_table("jobs") as t:
        t.add_column(sa.Column("webhook_url", sa.String(2000)))
        t.add_column(sa.Column("webhook_events", sa.JSON))

    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(64), primary_key=True),  # '' when auth is off
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(16), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),  # 'default' when auth is off
        sa.Column("webhook_secret", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(64), primary_key=True),  # also the webhook-id header
        sa.Column("tenant", sa.String(64)),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | failed
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("delivered_at", sa.Float),
        sa.Column("last_error", sa.String(500)),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_deliveries_object_id", "webhook_deliveries", ["object_id"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.String(500)),
        sa.Column("duration_s", sa.Float, nullable=False),
    )
    op.create_index("ix_webhook_attempts_delivery_id", "webhook_attempts", ["delivery_id"])


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("tenants")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("jobs") as t:
        t.drop_column("webhook_events")
        t.drop_column("webhook_url")
    with op.batch_alter_table("batches") as t:
        t.drop_column("retry_of")
        t.drop_column("webhook_events")
        t.drop_column("webhook_url")
