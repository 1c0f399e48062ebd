"""Alembic environment: the URL comes from the caller (shared.migrate), never from a file."""

from __future__ import annotations

from alembic import context

from genq.shared.db import Base, engine_for

config = context.config
url = config.attributes.get("database_url")
if not url:
    from genq.shared.config import get_settings

    url = get_settings().database_url

engine = engine_for(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
