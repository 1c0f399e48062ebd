"""Guarded state transitions, on SQLite and on the real Postgres: a duplicated or late message
cannot move a finished job, run it twice, or overwrite another worker's outcome."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from genq.services import jobs as records
from genq.services.validation import validate_batch
from genq.shared import jobs as jd
from genq.shared.db import Batch, Job, session_factory, session_scope
from genq.shared.finalize import maybe_finalize_batch
from genq.shared.migrate import upgrade
from genq.shared.registry import parse_registry
from genq.shared.storage import FileStorage

REG = parse_registry('[models.m]\nkind = "text"\nsource = "x"\n', Path("."))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/t.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    yield session_factory(url)


def _batch(factory: sessionmaker[Session], n: int = 3) -> tuple[str, list[str]]:
    lines, errors = validate_batch(
        [(i + 1, {"custom_id": f"c{i}", "url": "/v1/completions", "body": {"model": "m", "prompt": f"p{i}"}})
         for i in range(n)], REG, max_lines=100)
    assert not errors
    with session_scope(factory) as s:
        batch, pubs = records.create_batch(s, lines=lines, endpoint="/v1/completions", tenant=None)
    return batch.id, [p.job_id for p in pubs]


def test_claim_is_exclusive_and_finish_is_final(factory: sessionmaker[Session]) -> None:
    _, (job_id, *_) = _batch(factory)
    with session_scope(factory) as s:
        assert jd.claim_job(s, job_id, worker="A", lease_s=30) is not None
    with session_scope(factory) as s:  # a duplicate delivery while A holds the lease
        assert jd.claim_job(s, job_id, worker="B", lease_s=30) is None
    with session_scope(factory) as s:
        assert not jd.finish_job(s, job_id, worker="B", status="succeeded", result={"x": 1})
        assert jd.finish_job(s, job_id, worker="A", status="succeeded", result={"x": 2})
    with session_scope(factory) as s:
        assert jd.claim_job(s, job_id, worker="B", lease_s=30) is None  # redelivered after success
        assert not records.cancel_job(s, job_id)
        job = s.get(Job, job_id)
        assert job.status == "succeeded" and job.result == {"x": 2} and job.attempts == 1


def test_cancel_beats_a_running_worker(factory: sessionmaker[Session]) -> None:
    _, (job_id, *_) = _batch(factory)
    with session_scope(factory) as s:
        jd.claim_job(s, job_id, worker="A", lease_s=30)
    with session_scope(factory) as s:
        assert records.cancel_job(s, job_id)
        assert s.get(Job, job_id).status == "cancelled"
    with session_scope(factory) as s:
        assert not jd.finish_job(s, job_id, worker="A", status="succeeded", result={"late": True})
        assert s.get(Job, job_id).status == "cancelled"


def test_expired_lease_is_recovered_then_failed_after_max_attempts(factory: sessionmaker[Session]) -> None:
    _, (job_id, *_) = _batch(factory)
    for attempt in (1, 2):
        with session_scope(factory) as s:
            assert jd.claim_job(s, job_id, worker=f"W{attempt}", lease_s=-1) is not None  # lease already over
        with session_scope(factory) as s:
            pubs, failed = jd.requeue_expired(s, models=["m"], max_attempts=2)
        if attempt == 1:
            assert [p.job_id for p in pubs] == [job_id] and failed == []
        else:
            assert pubs == [] and failed == [job_id]
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        assert job.status == "failed" and job.error["code"] == "worker_lost" and job.attempts == 2


def test_renewed_lease_is_not_recovered(factory: sessionmaker[Session]) -> None:
    _, (job_id, *_) = _batch(factory)
    with session_scope(factory) as s:
        jd.claim_job(s, job_id, worker="A", lease_s=-1)
    with session_scope(factory) as s:
        assert jd.renew_leases(s, [job_id], worker="A", lease_s=30) == 1
    with session_scope(factory) as s:
        assert jd.requeue_expired(s, models=["m"]) == ([], [])


def test_batch_finalizes_once_with_files_in_input_order(factory: sessionmaker[Session], tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "obj")
    batch_id, ids = _batch(factory, 4)
    assert maybe_finalize_batch(factory, storage, batch_id) is None  # jobs still queued
    for i, job_id in enumerate(ids):
        with session_scope(factory) as s:
            jd.claim_job(s, job_id, worker="A", lease_s=30)
            ok = i != 2
            jd.finish_job(s, job_id, worker="A", status="succeeded" if ok else "failed",
                          result={"i": i} if ok else None, error=None if ok else {"code": "boom", "message": "x"})
    assert maybe_finalize_batch(factory, storage, batch_id) == "completed"
    assert maybe_finalize_batch(factory, storage, batch_id) is None  # a second finalizer does nothing
    with session_scope(factory) as s:
        batch = s.get(Batch, batch_id)
        assert batch.status == "completed" and batch.completed_at >= batch.finalizing_at
        from genq.shared.db import File

        out = storage.get(s.get(File, batch.output_file_id).key).decode().splitlines()
        err = storage.get(s.get(File, batch.error_file_id).key).decode().splitlines()
        counts = jd.request_counts(jd.batch_counts(s, batch_id))
    assert [line.count('"custom_id":"c') for line in out] == [1, 1, 1]
    assert ['"c0"' in out[0], '"c1"' in out[1], '"c3"' in out[2]] == [True] * 3
    # A code outside the catalogue ("boom") is answered as a runtime error, a 500 response.
    assert len(err) == 1 and '"status_code":500' in err[0] and '"code":"runtime_error"' in err[0]
    assert counts["completed"] == 3 and counts["failed"] == 1 and counts["total"] == 4


def test_cancel_batch_keeps_finished_work(factory: sessionmaker[Session], tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "obj")
    batch_id, ids = _batch(factory, 3)
    with session_scope(factory) as s:
        jd.claim_job(s, ids[0], worker="A", lease_s=30)
        jd.finish_job(s, ids[0], worker="A", status="succeeded", result={"ok": 1})
    with session_scope(factory) as s:
        assert records.cancel_batch(s, batch_id)
    assert maybe_finalize_batch(factory, storage, batch_id) == "cancelled"
    with session_scope(factory) as s:
        batch = s.get(Batch, batch_id)
        counts = jd.batch_counts(s, batch_id)
        assert batch.status == "cancelled" and batch.output_file_id and batch.error_file_id
        assert counts == {"succeeded": 1, "cancelled": 2}
        assert not records.cancel_batch(s, batch_id)  # already cancelled: nothing changes




def test_a_group_claim_takes_only_what_is_claimable(factory: sessionmaker[Session]) -> None:
    """claim_jobs, the worker's claim of a group of jobs in one statement, keeps claim_job's guards
    job by job: a cancelled job stays cancelled, a job another worker leases stays its own, and
    an expired lease is taken over."""
    _, (free, cancelled, leased, expired) = _batch(factory, 4)
    with session_scope(factory) as s:
        assert records.cancel_job(s, cancelled)
        assert jd.claim_job(s, leased, worker="B", lease_s=30) is not None
        assert jd.claim_job(s, expired, worker="C", lease_s=-1) is not None
    with session_scope(factory) as s:
        claimed = jd.claim_jobs(s, [free, cancelled, leased, expired], worker="A", lease_s=30)
    assert sorted(claimed) == sorted([free, expired])
    assert (claimed[expired].attempts, claimed[expired].worker, claimed[free].attempts) == (2, "A", 1)
    with session_scope(factory) as s:
        assert [(s.get(Job, j).status, s.get(Job, j).worker) for j in (cancelled, leased)] == [
            ("cancelled", None), ("running", "B")]


def test_a_group_finish_records_only_the_jobs_the_worker_still_holds(factory: sessionmaker[Session]) -> None:
    """finish_jobs, the outcomes of a group in one round trip: a job cancelled between its claim
    and its finish stays cancelled, one whose expired lease another worker took is not finished
    by the first, and each of the others gets its own outcome, a failure as much as a success."""
    _, (ok, bad, cancelled, taken) = _batch(factory, 4)
    with session_scope(factory) as s:
        assert len(jd.claim_jobs(s, [ok, bad, cancelled], worker="A", lease_s=30)) == 3
        assert jd.claim_job(s, taken, worker="A", lease_s=-1) is not None
    with session_scope(factory) as s:
        assert records.cancel_job(s, cancelled)
        assert jd.claim_job(s, taken, worker="B", lease_s=30) is not None
    error = {"code": "runtime_error", "message": "boom"}
    with session_scope(factory) as s:
        recorded = jd.finish_jobs(s, [jd.Outcome(ok, "succeeded", result={"i": 0}),
                                      jd.Outcome(bad, "failed", error=error),
                                      jd.Outcome(cancelled, "succeeded", result={"late": 1}),
                                      jd.Outcome(taken, "succeeded", result={"late": 2})], worker="A")
    assert recorded == {ok, bad}
    with session_scope(factory) as s:
        rows = {j: s.get(Job, j) for j in (ok, bad, cancelled, taken)}
        assert [(rows[ok].status, rows[ok].result, rows[ok].progress, rows[ok].lease_expires_at)] == [
            ("succeeded", {"i": 0}, 1.0, None)]
        assert (rows[bad].status, rows[bad].error, rows[bad].result) == ("failed", error, None)
        assert (rows[cancelled].status, rows[cancelled].result) == ("cancelled", None)
        assert (rows[taken].status, rows[taken].worker, rows[taken].result) == ("running", "B", None)
    with session_scope(factory) as s:  # SQL NULL, not JSON null, where no result or error was given
        from sqlalchemy import select

        assert s.scalars(select(Job.id).where(Job.id.in_([ok, bad]), Job.error.is_(None))).all() == [ok]
