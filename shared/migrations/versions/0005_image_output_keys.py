"""Image results keep their storage keys in one typed list (`output_keys`), and jobs lose the
`output_key` column, which was written and never read.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

IMAGES_URL = "/v1/images/generations"
jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("url", sa.String), sa.column("result", sa.JSON))


def _moved(result: dict[str, Any]) -> dict[str, Any] | None:
    """The result with data[i].output_key moved to output_keys[i]; None if there is nothing to move."""
    data = result.get("data")
    if not isinstance(data, list) or not any(isinstance(d, dict) and "output_key" in d for d in data):
        return None
    keys = [d.get("output_key") for d in data if isinstance(d, dict)]
    rest = [{k: v for k, v in d.items() if k != "output_key"} if isinstance(d, dict) else d for d in data]
    return {**result, "data": rest, "output_keys": keys}


def _rewrite_image_results(change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Store `change(result)` for every image job whose result it changes (None: leave it)."""
    conn = op.get_bind()
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.result).where(jobs.c.url == IMAGES_URL,
                                                                   jobs.c.result.is_not(None))).all()
    for job_id, result in rows:
        changed = change(result) if isinstance(result, dict) else None
        if changed is not None:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(result=changed))


def upgrade() -> None:
    _rewrite_image_results(_moved)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("output_key")


def _restored(result: dict[str, Any]) -> dict[str, Any] | None:
    """The reverse of `_moved`: output_keys[i] back into data[i].output_key."""
    keys = result.get("output_keys")
    data = result.get("data")
    if not isinstance(keys, list) or not isinstance(data, list):
        return None
    rest = {k: v for k, v in result.items() if k != "output_keys"}
    return {**rest, "data": [{**d, "output_key": key} if isinstance(d, dict) else d
                             for d, key in zip(data, keys, strict=False)]}


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("output_key", sa.String(300)))
    _rewrite_image_results(_restored)
