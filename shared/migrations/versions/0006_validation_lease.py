"""A lease on a `validating` batch (`validating_until`), so that another API process resumes the
validation within seconds of its owner dying rather than minutes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("validating_until", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("validating_until")
