"""LoRA adapters and worker state (model cache and batching counters for /metrics).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64)),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("files", sa.JSON, nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("metadata", sa.JSON),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_adapters_tenant_name", "adapters", ["tenant", "name"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
    )
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_workers_heartbeat_at", table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_adapters_tenant_name", table_name="adapters")
    op.drop_table("adapters")
