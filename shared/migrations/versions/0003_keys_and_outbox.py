"""API keys (stored hashed) and the publish outbox marker on jobs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_index("ix_api_keys_key_hash", "api_keys", ["key_hash"], unique=True)
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    # NULL until the job's message is handed to the broker: a sweeper publishes what an API
    # process recorded while the broker was down. Existing rows count as published.
    with op.batch_alter_table("jobs") as t:
        t.add_column(sa.Column("published_at", sa.Float))
    op.execute("UPDATE jobs SET published_at = created_at")
    op.create_index("ix_jobs_unpublished", "jobs", ["published_at", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_unpublished", "jobs")
    with op.batch_alter_table("jobs") as t:
        t.drop_column("published_at")
    op.drop_table("api_keys")
