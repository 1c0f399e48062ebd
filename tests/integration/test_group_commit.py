"""A worker's concurrent jobs share their claims, outcomes and batch checks (workers/coalesce.py),
on SQLite and on the real Postgres: each job still gets its own outcome, a job that fails fails
alone, and every webhook event and the batch's finalization happen exactly once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from genq.services import jobs as records
from genq.services.validation import validate_batch
from genq.shared.broker import Publish
from genq.shared.config import build_settings
from genq.shared.db import Batch, Job, WebhookDelivery, session_factory, session_scope
from genq.shared.migrate import upgrade
from genq.shared.registry import parse_registry
from genq.shared.storage import FileStorage
from genq.workers.runtime import WorkerRuntime

REGISTRY = '[models.echo]\nkind = "echo"\nsource = "none"\n'
HOOK = "https://hooks.example.com/genq"


class NoBroker:
    """The runtime's publisher; these jobs are handed to execute() directly."""

    def publish(self, items: Iterable[Publish]) -> int:
        return len(list(items))

    def ping(self) -> None:
        pass

    def pending(self, model: str) -> int | None:
        return 0

    def epoch(self) -> float | None:
        return None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/t.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    return url  # type: ignore[no-any-return]


@pytest.fixture
def runtime(url: str, tmp_path: Path) -> Iterator[WorkerRuntime]:
    settings = build_settings(database_url=url, broker_url="memory://", storage_url=f"file://{tmp_path}/obj")
    rt = WorkerRuntime(settings, parse_registry(REGISTRY, tmp_path), FileStorage(tmp_path / "obj"), NoBroker(),
                       models=["echo"], lease_s=30, max_attempts=3)
    yield rt
    rt.stop()


def _lines(n: int) -> list[tuple[int, dict[str, object]]]:
    return [(i + 1, {"custom_id": f"c{i}", "url": "/v1/completions", "body": {"model": "echo", "prompt": f"p{i}"}})
            for i in range(n)]


def _submit(factory: sessionmaker[Session], registry_dir: Path) -> tuple[str, list[str], list[str]]:
    """A batch of 12 with a webhook, and 4 jobs of their own with one each."""
    registry = parse_registry(REGISTRY, registry_dir)
    lines, errors = validate_batch(_lines(12), registry, max_lines=100)
    alone, more = validate_batch(_lines(4), registry, max_lines=100)
    assert not errors and not more
    with session_scope(factory) as s:
        batch, pubs = records.create_batch(s, lines=lines, endpoint="/v1/completions", tenant=None, webhook_url=HOOK)
        singles = [records.create_job(s, line=line, tenant=None)[0].id for line in alone]
        s.execute(update(Job).where(Job.id.in_(singles)).values(webhook_url=HOOK))
    return batch.id, [p.job_id for p in pubs], singles


def test_concurrent_jobs_each_get_their_own_outcome_and_events_once(runtime: WorkerRuntime, url: str,
                                                                     tmp_path: Path) -> None:
    factory = session_factory(url)
    batch_id, batched, singles = _submit(factory, tmp_path)
    broken = batched[5]
    with session_scope(factory) as s:  # a body the worker cannot read: this job alone must fail
        s.execute(update(Job).where(Job.id == broken).values(body={"model": "echo"}))
    jobs = batched + singles
    with ThreadPoolExecutor(len(jobs)) as pool:
        outcomes = dict(zip(jobs, pool.map(runtime.execute, jobs), strict=True))
    assert outcomes[broken] == "failed"
    assert all(outcome == "succeeded" for job, outcome in outcomes.items() if job != broken), outcomes
    assert runtime._claims.items == runtime._finishes.items == len(jobs)
    with session_scope(factory) as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(jobs)))}
        assert rows[broken].status == "failed" and rows[broken].error["code"] == "runtime_error"
        prompts = {job_id: f"p{i}" for group in (batched, singles) for i, job_id in enumerate(group)}
        for job_id in jobs:
            if job_id != broken:  # each its own answer
                assert rows[job_id].result["choices"][0]["text"] == prompts[job_id]
        batch = s.get(Batch, batch_id)
        assert batch.status == "completed" and batch.output_file_id and batch.error_file_id
        ours = WebhookDelivery.object_id.in_([*jobs, batch_id])  # the database may be shared with other tests
        events = sorted((d.event, d.object_id) for d in s.scalars(select(WebhookDelivery).where(ours)))
    assert events == sorted([("batch.completed", batch_id)] + [("job.completed", j) for j in singles])
    assert runtime.execute(batched[0]) == "skipped (succeeded)"  # a redelivered message changes nothing
