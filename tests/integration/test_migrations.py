"""The Alembic migrations build exactly the schema the ORM models describe, on SQLite and Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from genq.shared.db import Base, engine_for
from genq.shared.migrate import upgrade


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_migrations_match_models(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path}/m.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    upgrade(url)  # a second run is a no-op
    with engine_for(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_0005_moves_image_output_keys_into_their_own_list(tmp_path: Path) -> None:
    import json

    from sqlalchemy import text

    url = f"sqlite:///{tmp_path}/old.db"
    upgrade(url, "0004")
    old = {"created": 1, "parameters": {"seed": 3},
           "data": [{"output_key": "jobs/j/1/0.png", "seed": 3, "index": 0, "revised_prompt": None},
                    {"output_key": "jobs/j/1/1.png", "seed": 4, "index": 1, "revised_prompt": None}]}
    text_result = {"object": "text_completion", "choices": []}
    with engine_for(url).begin() as conn:
        for job_id, job_url, result in (("job_img", "/v1/images/generations", old),
                                        ("job_txt", "/v1/completions", text_result)):
            conn.execute(text("INSERT INTO jobs (id, seq, url, model, body, status, progress, attempts, created_at, "
                              "result, output_key) VALUES (:id, 0, :url, 'm', '{}', 'succeeded', 1, 1, 0, :r, 'k')"),
                         {"id": job_id, "url": job_url, "r": json.dumps(result)})
    upgrade(url)
    with engine_for(url).connect() as conn:
        rows = dict(conn.execute(text("SELECT id, result FROM jobs")).all())
        columns = [c[1] for c in conn.execute(text("PRAGMA table_info(jobs)")).all()]
    assert json.loads(rows["job_img"]) == {
        "created": 1, "parameters": {"seed": 3}, "output_keys": ["jobs/j/1/0.png", "jobs/j/1/1.png"],
        "data": [{"seed": 3, "index": 0, "revised_prompt": None}, {"seed": 4, "index": 1, "revised_prompt": None}]}
    assert json.loads(rows["job_txt"]) == text_result
    assert "output_key" not in columns

    from alembic import command

    from genq.shared.migrate import alembic_config

    command.downgrade(alembic_config(url), "0004")  # and back: the old code finds its keys again
    with engine_for(url).connect() as conn:
        back = dict(conn.execute(text("SELECT id, result FROM jobs")).all())
    assert json.loads(back["job_img"]) == old and json.loads(back["job_txt"]) == text_result


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_0007_adds_the_fine_tuning_tables_and_takes_them_away(backend: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    from alembic import command
    from sqlalchemy import inspect, text
    from sqlalchemy.orm import Session

    from genq.shared.fine_tuning_jobs import add_event
    from genq.shared.migrate import alembic_config

    url = f"sqlite:///{tmp_path}/ft.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    tables = {"fine_tuning_jobs", "fine_tuning_events", "fine_tuning_checkpoints"}

    def present() -> set[str]:
        return tables & set(inspect(engine_for(url)).get_table_names())

    upgrade(url)
    command.downgrade(alembic_config(url), "0006")  # the Postgres database is shared: start from 0006 there too
    assert present() == set()
    upgrade(url)
    assert present() == tables
    with Session(engine_for(url)) as session:  # events take their order from the database's own sequence
        for i in range(3):
            add_event(session, "ftjob-x", f"event {i}", data={"i": i})
        session.commit()
        rows = session.execute(text("SELECT seq, message, data FROM fine_tuning_events WHERE job_id = 'ftjob-x' "
                                    "ORDER BY seq")).all()
    assert [m for _, m, _ in rows] == ["event 0", "event 1", "event 2"] and len({s for s, _, _ in rows}) == 3
    command.downgrade(alembic_config(url), "0006")
    assert present() == set()
    upgrade(url)  # back at the head for the session's other tests


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_0008_adds_the_requested_model_of_jobs_and_takes_it_away(backend: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from genq.shared.migrate import alembic_config

    url = f"sqlite:///{tmp_path}/rm.db" if backend == "sqlite" else request.getfixturevalue("pg_url")

    def columns() -> set[str]:
        return {c["name"] for c in inspect(engine_for(url)).get_columns("jobs")}

    upgrade(url)
    assert "requested_model" in columns()
    command.downgrade(alembic_config(url), "0007")
    assert "requested_model" not in columns() and {"model", "body"} <= columns()
    upgrade(url)  # back at the head for the session's other tests
    assert "requested_model" in columns()
