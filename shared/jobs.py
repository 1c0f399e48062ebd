"""Job state both processes change: counts, and the worker's claim, lease, progress and outcome.
Every state change is a guarded UPDATE, so a duplicated or redelivered message, or two racing
processes, cannot move a finished job or run it twice."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Connection, Float, bindparam, func, select, update
from sqlalchemy.orm import Session

from genq.shared.broker import Publish
from genq.shared.db import Job
from genq.shared.errors import ErrorCode, job_error
from genq.shared.schemas import TERMINAL_JOB_STATUSES

ACTIVE = ("queued", "running")
NULLABLE_JSON = JSON(none_as_null=True)  # None is SQL NULL, as in an ORM update, not JSON 'null'


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    ).all()
    return dict(rows)


def request_counts(counts: dict[str, int]) -> dict[str, int]:
    """OpenAI's request_counts (plus genq's cancelled, running and queued) from per-status counts.

    The total is their sum rather than the batch row's `total`: one query's counts always add up,
    even while a concurrent transaction moves the batch from `validating` to `in_progress`."""
    return {
        "total": sum(counts.values()),
        "completed": counts.get("succeeded", 0),
        "failed": counts.get("failed", 0),
        "cancelled": counts.get("cancelled", 0),
        "running": counts.get("running", 0),
        "queued": counts.get("queued", 0),
    }


def has_active_jobs(session: Session | Connection, batch_id: str) -> bool:
    q = select(Job.id).where(Job.batch_id == batch_id, Job.status.in_(ACTIVE)).limit(1)
    return session.execute(q).first() is not None



# --- worker side ----------------------------------------------------------------------------

def claim_job(session: Session, job_id: str, *, worker: str, lease_s: float) -> Job | None:
    """Move a queued job (or one whose lease ran out) to running for this worker."""
    return claim_jobs(session, [job_id], worker=worker, lease_s=lease_s).get(job_id)


def _claim_statement() -> Any:
    """claim_jobs' statement, built once: SQLAlchemy memoizes a statement's cache key, so a worker
    does not derive it again for every group it claims."""
    now = bindparam("now", type_=Float)
    claimable = (Job.status == "queued") | ((Job.status == "running") & (Job.lease_expires_at < now))
    locked = (select(Job.id).where(Job.id.in_(bindparam("ids", expanding=True)), claimable)
              .order_by(Job.id).with_for_update())
    return (
        update(Job)
        .where(Job.id.in_(locked), claimable)
        .values(status="running", worker=bindparam("worker"), lease_expires_at=bindparam("until", type_=Float),
                started_at=now, attempts=Job.attempts + 1, progress=0.0)
        .returning(Job)
        .execution_options(populate_existing=True, synchronize_session=False)
    )


CLAIM = _claim_statement()


def claim_jobs(session: Session, job_ids: list[str], *, worker: str, lease_s: float) -> dict[str, Job]:
    """claim_job for many jobs in one statement; returns the claimed ones by id. The rows are
    locked in id order (Postgres), so two workers claiming overlapping groups cannot deadlock."""
    now = time.time()
    params = {"ids": job_ids, "now": now, "worker": worker, "until": now + lease_s}
    return {job.id: job for job in session.execute(CLAIM, params).scalars()}


def renew_leases(session: Session, job_ids: list[str], *, worker: str, lease_s: float) -> int:
    if not job_ids:
        return 0
    res = session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.status == "running", Job.worker == worker)
        .values(lease_expires_at=time.time() + lease_s)
    )
    return res.rowcount  # type: ignore[attr-defined,no-any-return]


def set_progress(session: Session, job_id: str, progress: float, *, worker: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
        .values(progress=max(0.0, min(1.0, progress)))
    )


@dataclass(frozen=True)
class Outcome:
    """A job's end as a worker records it: a terminal status with its result or error."""

    job_id: str
    status: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        assert self.status in TERMINAL_JOB_STATUSES


def finish_job(session: Session, job_id: str, *, worker: str, status: str,
               result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
    """Record the outcome, only if this worker still holds the job (not cancelled, not re-leased)."""
    return bool(finish_jobs(session, [Outcome(job_id, status, result, error)], worker=worker))


def _finish_statement() -> Any:
    """finish_jobs' statement (an executemany), built once as claim_jobs' is."""
    table = Job.__table__
    mine = (table.c.status == "running", table.c.worker == bindparam("me"))
    return (update(table).where(table.c.id == bindparam("job_id"), *mine)
            .values(status=bindparam("to"), result=bindparam("res", type_=NULLABLE_JSON),
                    error=bindparam("err", type_=NULLABLE_JSON), finished_at=bindparam("now", type_=Float),
                    lease_expires_at=None, progress=func.coalesce(bindparam("done", type_=Float), table.c.progress)))


FINISH = _finish_statement()


def finish_jobs(session: Session, outcomes: list[Outcome], *, worker: str) -> set[str]:
    """finish_job for many jobs in one round trip (an executemany, in id order so that two
    writers lock rows in the same order); returns the ids recorded. When some were not (cancelled
    or taken over meanwhile), one query tells which: those stamped with this call's time."""
    if not outcomes:
        return set()
    now = time.time()
    rows = [{"job_id": o.job_id, "to": o.status, "res": o.result, "err": o.error, "me": worker, "now": now,
             "done": 1.0 if o.status == "succeeded" else None}
            for o in sorted(outcomes, key=lambda o: o.job_id)]
    changed = session.connection().execute(FINISH, rows).rowcount
    ids = [r["job_id"] for r in rows]
    if changed == len(ids):
        return set(ids)
    return set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.worker == worker, Job.finished_at == now)))


def release_job(session: Session, job_id: str, *, worker: str, count_attempt: bool = True) -> bool:
    """Hand a running job back to the queue (a worker stopping mid-job, storage down). Its message
    is gone, so it counts as unpublished: the outbox sweeper sends it again. With
    `count_attempt=False` the attempt its claim counted is given back (the job was not at fault)."""
    attempts = {} if count_attempt else {"attempts": Job.attempts - 1}
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
        .values(status="queued", worker=None, lease_expires_at=None, progress=0.0, published_at=None,
                **attempts)
    )
    return res.rowcount > 0  # type: ignore[attr-defined]


def requeue_expired(session: Session, *, models: list[str] | None = None,
                    max_attempts: int = 3) -> tuple[list[Publish], list[str]]:
    """Find running jobs whose worker stopped renewing its lease. Jobs with attempts left go
    back to queued (to be published again); the rest fail. Returns (to publish, failed ids)."""
    now = time.time()
    q = select(Job.id, Job.model, Job.priority, Job.attempts).where(
        Job.status == "running", Job.lease_expires_at < now)
    if models:
        q = q.where(Job.model.in_(models))
    publish: list[Publish] = []
    failed: list[str] = []
    for job_id, model, priority, attempts in session.execute(q.limit(500)).all():
        guard = (Job.id == job_id, Job.status == "running", Job.lease_expires_at < now)
        if attempts >= max_attempts:
            res = session.execute(update(Job).where(*guard).values(
                status="failed", finished_at=now, lease_expires_at=None,
                error=job_error(ErrorCode.WORKER_LOST,
                                f"the worker running this job stopped {attempts} times; giving up")))
            if res.rowcount:  # type: ignore[attr-defined]
                failed.append(job_id)
        else:
            # Unpublished until the caller's publish succeeds; if it fails the outbox sweeper sends it.
            res = session.execute(update(Job).where(*guard).values(
                status="queued", worker=None, lease_expires_at=None, progress=0.0, published_at=None))
            if res.rowcount:  # type: ignore[attr-defined]
                publish.append(Publish(job_id, model, priority, front=True))  # it waited already
    return publish, failed
