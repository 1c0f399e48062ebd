"""Jobs, batches and files.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64)),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64)),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("metadata", sa.JSON),
        sa.Column("errors", sa.JSON),
        sa.Column("created_at", sa.Float, nullable=False),
        *[sa.Column(f"{name}_at", sa.Float) for name in (
            "in_progress", "expires", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")],
    )
    op.create_index("ix_batches_tenant", "batches", ["tenant"])
    op.create_index("ix_batches_status", "batches", ["status"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("batch_id", sa.String(64)),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("tenant", sa.String(64)),
        sa.Column("custom_id", sa.String(512)),
        sa.Column("url", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(200)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("error", sa.JSON),
        sa.Column("result", sa.JSON),
        sa.Column("output_key", sa.String(300)),
    )
    op.create_index("ix_jobs_batch_seq", "jobs", ["batch_id", "seq"])
    op.create_index("ix_jobs_batch_status", "jobs", ["batch_id", "status"])
    op.create_index("ix_jobs_status_lease", "jobs", ["status", "lease_expires_at"])
    op.create_index("ix_jobs_model_status", "jobs", ["model", "status"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])

    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64)),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_files_tenant", "files", ["tenant"])


def downgrade() -> None:
    op.drop_table("files")
    op.drop_table("jobs")
    op.drop_table("batches")
