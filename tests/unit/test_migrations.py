"""The Alembic migrations build exactly the schema the ORM models describe, on SQLite and Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from genq.shared.db import Base, engine_for
from genq.shared.migrate import upgrade


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrations_match_models(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path}/m.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    upgrade(url)  # a second run is a no-op
    with engine_for(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
