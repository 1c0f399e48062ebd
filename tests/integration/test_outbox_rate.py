"""How fast the outbox sweeper re-publishes a backlog (an API that died mid-publish leaves tens of
thousands of jobs unpublished), on Postgres and a real Redis: one upkeep pass must publish more
than the one 1,000-job page it used to, and all of it must reach the broker exactly once."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from genq.shared import outbox
from genq.shared.broker import CeleryPublisher, make_celery, queue_name
from genq.shared.config import build_settings
from genq.shared.db import Job, session_factory, session_scope
from genq.shared.migrate import upgrade

pytestmark = pytest.mark.integration
BACKLOG = 20_000


def _record_unpublished(factory: sessionmaker[Session], model: str, n: int) -> None:
    created = time.time() - 60  # older than the grace the sweeper leaves a publishing process
    rows = [{"id": f"job_{uuid.uuid4().hex}", "seq": i, "url": "/v1/completions", "model": model,
             "body": {"model": model, "prompt": "p"}, "status": "queued", "progress": 0.0, "attempts": 0,
             "created_at": created} for i in range(n)]
    with session_scope(factory) as s:
        for start in range(0, n, 5000):
            s.execute(insert(Job), rows[start:start + 5000])


def test_a_backlog_is_republished_at_thousands_of_jobs_per_second(pg_url: str, redis_url: str,
                                                                   tmp_path: Path) -> None:
    import redis

    upgrade(pg_url)
    factory = session_factory(pg_url)
    settings = build_settings(broker_url=redis_url, database_url=pg_url, storage_url=f"file://{tmp_path}/obj")
    publisher = CeleryPublisher(make_celery(settings))
    model = f"rate-{uuid.uuid4().hex[:6]}"
    _record_unpublished(factory, model, BACKLOG)

    passes: list[tuple[int, float]] = []
    while len(passes) < 30:
        started = time.monotonic()
        sent = outbox.sweep_unpublished(factory, publisher, models=[model])
        passes.append((sent, time.monotonic() - started))
        if sent == 0:
            break
    published = sum(n for n, _ in passes)
    busy_s = sum(s for n, s in passes if n)
    with factory() as s:
        left = s.scalar(select(func.count()).select_from(Job).where(Job.model == model, Job.published_at.is_(None)))
    client = redis.Redis.from_url(redis_url)  # kombu's lists: one per priority step
    queued = sum(client.llen(f"{queue_name(model)}:{p}" if p else queue_name(model)) for p in range(10))
    print("recovery figures:", json.dumps({"backlog": BACKLOG, "passes": len(passes) - 1,
                                           "first_pass_jobs": passes[0][0],
                                           "jobs_per_s_while_sweeping": round(published / busy_s)}))
    assert published == BACKLOG and left == 0 and queued == BACKLOG
    assert passes[0][0] > outbox.SWEEP_LIMIT  # more than one page per upkeep pass (every 5 s)
