"""Job state both processes change: counts, and the worker's claim, lease, progress and outcome.
Every state change is a guarded UPDATE, so a duplicated or redelivered message, or two racing
processes, cannot move a finished job or run it twice."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from genq.shared.broker import Publish
from genq.shared.db import Job
from genq.shared.errors import ErrorCode, job_error
from genq.shared.schemas import TERMINAL_JOB_STATUSES

ACTIVE = ("queued", "running")


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


def has_active_jobs(session: Session, batch_id: str) -> bool:
    q = select(Job.id).where(Job.batch_id == batch_id, Job.status.in_(ACTIVE)).limit(1)
    return session.execute(q).first() is not None



# --- worker side ----------------------------------------------------------------------------

def claim_job(session: Session, job_id: str, *, worker: str, lease_s: float) -> Job | None:
    """Move a queued job (or one whose lease ran out) to running for this worker."""
    now = time.time()
    stmt = (
        update(Job)
        .where(Job.id == job_id,
               (Job.status == "queued") | ((Job.status == "running") & (Job.lease_expires_at < now)))
        .values(status="running", worker=worker, lease_expires_at=now + lease_s, started_at=now,
                attempts=Job.attempts + 1, progress=0.0)
        .returning(Job)
        .execution_options(populate_existing=True)
    )
    return session.execute(stmt).scalar_one_or_none()


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


def finish_job(session: Session, job_id: str, *, worker: str, status: str,
               result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
    """Record the outcome, only if this worker still holds the job (not cancelled, not re-leased)."""
    assert status in TERMINAL_JOB_STATUSES
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
        .values(status=status, result=result, error=error,
                finished_at=time.time(), lease_expires_at=None,
                progress=1.0 if status == "succeeded" else Job.progress)
    )
    return res.rowcount > 0  # type: ignore[attr-defined]


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
