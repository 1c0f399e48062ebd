"""Synchronous requests waiting on a queue hold no thread and no database connection: two API
processes of our own (Postgres, Redis, file storage, no worker, so every job stays queued) keep
answering probes and reads while dozens of `POST /v1/completions` wait, and the per-tenant cap on
waiting requests (GENQ_MAX_SYNC_WAITS_PER_TENANT) is shared by both processes through Redis."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

WAITERS = 45  # more than AnyIO's 40 threads and the API's 30 database connections
START_TIMEOUT_S = 12.0


@pytest.fixture(scope="module")
def apis(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Stack]]:
    """Two API processes on one database and Redis, with a cap of WAITERS waiting requests per tenant."""
    tmp = tmp_path_factory.mktemp("sync-waits")
    registry = tmp / "models.toml"
    models = ("sync-idle-a", "sync-idle-b")  # no worker serves them
    registry.write_text("".join(f'[models.{m}]\nkind = "echo"\nsource = "none"\n' for m in models))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_DATABASE_URL=pg_url, GENQ_BROKER_URL=redis_url, GENQ_STORAGE_URL=f"file://{tmp / 'objects'}",
               GENQ_MODELS_FILE=str(registry), GENQ_MAX_SYNC_WAITS_PER_TENANT=str(WAITERS), PYTHONUNBUFFERED="1")
    stacks = [Stack(env, tmp_path_factory.mktemp(f"sync-api-{i}")) for i in range(2)]
    try:
        for s in stacks:
            s.start_api()
        yield stacks
    except BaseException:
        print("\n".join(s.logs() for s in stacks))
        raise
    finally:
        for s in stacks:
            s.stop()


def _queued(pg_url: str, model: str) -> int:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM jobs WHERE model = :m AND status = 'queued'"),
                                    {"m": model}).scalar_one())
    finally:
        engine.dispose()


def _wait_many(base_url: str, model: str, n: int) -> tuple[ThreadPoolExecutor, list[Future[httpx.Response]]]:
    pool = ThreadPoolExecutor(n)

    def one(i: int) -> httpx.Response:
        return httpx.post(f"{base_url}/v1/completions", params={"start_timeout": START_TIMEOUT_S},
                          json={"model": model, "prompt": f"wait {i}"}, timeout=120)

    return pool, [pool.submit(one, i) for i in range(n)]


def test_probes_and_reads_answer_at_once_while_sync_requests_wait(apis: list[Stack], pg_url: str) -> None:
    api = apis[0]
    pool, waiting = _wait_many(api.base_url, "sync-idle-a", WAITERS)
    try:
        wait_for(lambda: _queued(pg_url, "sync-idle-a") == WAITERS, 60, 0.2, f"{WAITERS} queued sync jobs")
        with api.client() as c:
            began = time.monotonic()
            assert c.get("/healthz").status_code == 200
            healthz_s = time.monotonic() - began
            began = time.monotonic()
            assert c.get("/v1/batches").status_code == 200  # a database read: a connection is free
            read_s = time.monotonic() - began
        assert healthz_s < 1.0 and read_s < 2.0, (healthz_s, read_s)
        answers = [f.result(timeout=120) for f in waiting]
    finally:
        pool.shutdown(wait=True)
    # Every one of them waited its start_timeout and was told why: none ran out of threads or connections.
    codes = sorted({(r.status_code, r.json()["error"]["code"]) for r in answers})
    assert codes == [(503, "no_worker_available")], [r.text for r in answers if r.status_code != 503][:3]
    assert _queued(pg_url, "sync-idle-a") == 0  # and each job was cancelled


def test_the_cap_on_waiting_requests_is_shared_by_api_processes(apis: list[Stack], pg_url: str) -> None:
    pool, waiting = _wait_many(apis[0].base_url, "sync-idle-b", WAITERS)
    try:
        wait_for(lambda: _queued(pg_url, "sync-idle-b") == WAITERS, 60, 0.2, f"{WAITERS} queued sync jobs")
        with apis[1].client() as other:
            over = other.post("/v1/completions", json={"model": "sync-idle-b", "prompt": "one more"})
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "sync_waits_limit"
        assert int(over.headers["retry-after"]) >= 1
        assert _queued(pg_url, "sync-idle-b") == WAITERS  # refused before any job was made
        assert all(f.result(timeout=120).status_code == 503 for f in waiting)
    finally:
        pool.shutdown(wait=True)
    # The waits are over, so their places are free again, on either process.
    with apis[1].client() as other:
        resp = other.post("/v1/completions", params={"start_timeout": 0.2},
                          json={"model": "sync-idle-b", "prompt": "after"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_worker_available", resp.text
