"""Jobs remember the model name their request used when it is not the model that serves them (a
fine-tuned model's `ft:` name, served by its base model with its adapter).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("requested_model", sa.String(400)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("requested_model")
