"""Fine-tuning jobs, their events and their checkpoints.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64)),
        sa.Column("suffix", sa.String(64)),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("hyperparameters", sa.JSON, nullable=False),
        sa.Column("lora", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON),
        sa.Column("fine_tuned_model", sa.String(400), nullable=False),
        sa.Column("trained_tokens", sa.Integer),
        sa.Column("result_files", sa.JSON, nullable=False),
        sa.Column("error", sa.JSON),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("cancel_requested_at", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(200)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("webhook_url", sa.String(2048)),
        sa.Column("webhook_events", sa.JSON),
        sa.Column("published_at", sa.Float),
    )
    op.create_index("ix_fine_tuning_jobs_tenant_id", "fine_tuning_jobs", ["tenant", "id"])
    op.create_index("ix_fine_tuning_jobs_status_lease", "fine_tuning_jobs", ["status", "lease_expires_at"])
    op.create_table(
        "fine_tuning_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("message", sa.String(2000), nullable=False),
        sa.Column("data", sa.JSON),
    )
    op.create_index("ix_fine_tuning_events_job_seq", "fine_tuning_events", ["job_id", "seq"])
    op.create_table(
        "fine_tuning_checkpoints",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("key_prefix", sa.String(300), nullable=False),
    )
    op.create_index("ix_fine_tuning_checkpoints_job_step", "fine_tuning_checkpoints", ["job_id", "step"])


def downgrade() -> None:
    op.drop_index("ix_fine_tuning_checkpoints_job_step", table_name="fine_tuning_checkpoints")
    op.drop_table("fine_tuning_checkpoints")
    op.drop_index("ix_fine_tuning_events_job_seq", table_name="fine_tuning_events")
    op.drop_table("fine_tuning_events")
    op.drop_index("ix_fine_tuning_jobs_status_lease", table_name="fine_tuning_jobs")
    op.drop_index("ix_fine_tuning_jobs_tenant_id", table_name="fine_tuning_jobs")
    op.drop_table("fine_tuning_jobs")
