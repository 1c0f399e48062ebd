"""Data functions over jobs and batches. Every state change is a guarded UPDATE, so a duplicated
or redelivered message, or two racing processes, cannot move a finished job or run it twice."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from genq.shared.broker import Publish
from genq.shared.db import Batch, Job, new_id
from genq.shared.schemas import TERMINAL_JOB_STATUSES, window_seconds
from genq.shared.validation import ValidLine

ACTIVE = ("queued", "running")


def _job_row(v: ValidLine, *, tenant: str | None, batch_id: str | None, seq: int, now: float,
             priority: int | None) -> dict[str, Any]:
    return {
        "id": new_id("job"), "batch_id": batch_id, "seq": seq, "tenant": tenant,
        "custom_id": v.request.custom_id, "url": v.request.url, "model": v.body.model,  # type: ignore[attr-defined]
        "body": v.body.model_dump(exclude_unset=True),
        "priority": v.request.priority if v.request.priority is not None else priority,
        "webhook_url": v.request.webhook_url, "webhook_events": v.request.webhook_events,
        "status": "queued", "progress": 0.0, "attempts": 0, "created_at": now,
    }


def create_job(session: Session, *, line: ValidLine, tenant: str | None) -> tuple[Job, Publish]:
    row = _job_row(line, tenant=tenant, batch_id=None, seq=0, now=time.time(), priority=None)
    job = Job(**row)
    session.add(job)
    session.flush()
    return job, Publish(job.id, job.model, job.priority)


def new_batch(session: Session, *, endpoint: str, tenant: str | None, completion_window: str = "24h",
              status: str = "in_progress", **fields: Any) -> Batch:
    """A batch row without jobs (`validating` ones get theirs once their input file checks out)."""
    now = time.time()
    batch = Batch(id=new_id("batch"), tenant=tenant, endpoint=endpoint, completion_window=completion_window,
                  status=status, total=0, created_at=now,
                  expires_at=now + window_seconds(completion_window), **fields)
    if status == "in_progress":
        batch.in_progress_at = now
    session.add(batch)
    session.flush()
    return batch


def _insert_jobs(session: Session, batch: Batch, lines: list[ValidLine], now: float) -> list[Publish]:
    rows = [_job_row(v, tenant=batch.tenant, batch_id=batch.id, seq=i, now=now, priority=batch.priority)
            for i, v in enumerate(lines)]
    for start in range(0, len(rows), 5000):
        session.execute(insert(Job), rows[start:start + 5000])
    return [Publish(r["id"], r["model"], r["priority"]) for r in rows]


def create_batch(session: Session, *, lines: list[ValidLine], endpoint: str, tenant: str | None,
                 **fields: Any) -> tuple[Batch, list[Publish]]:
    """Insert a batch and its jobs in bulk; returns what to publish once committed."""
    batch = new_batch(session, endpoint=endpoint, tenant=tenant, **fields)
    batch.total = len(lines)
    return batch, _insert_jobs(session, batch, lines, batch.created_at)


def start_validated_batch(session: Session, batch: Batch, lines: list[ValidLine]) -> list[Publish] | None:
    """`validating` -> `in_progress` with its jobs, or None if another process got there first."""
    now = time.time()
    res = session.execute(update(Batch).where(Batch.id == batch.id, Batch.status == "validating")
                          .values(status="in_progress", in_progress_at=now, total=len(lines)))
    if res.rowcount == 0:  # type: ignore[attr-defined]
        return None
    return _insert_jobs(session, batch, lines, now)


def fail_validation(session: Session, batch_id: str, errors: list[dict[str, Any]]) -> bool:
    """OpenAI's behaviour: a batch with invalid input fails whole, listing each line's problem."""
    res = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "validating").values(
        status="failed", failed_at=time.time(), errors={"object": "list", "data": errors}))
    return res.rowcount > 0  # type: ignore[attr-defined]


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


# --- cancellation ---------------------------------------------------------------------------

def _cancel_values(now: float, code: str, message: str) -> dict[str, Any]:
    return {"status": "cancelled", "finished_at": now, "lease_expires_at": None,
            "error": {"code": code, "message": message}}


def cancel_job(session: Session, job_id: str) -> bool:
    """Cancel a queued or running job; a running worker notices and discards its work."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(**_cancel_values(time.time(), "cancelled", "cancelled by request"))
    )
    return res.rowcount > 0  # type: ignore[attr-defined]


def cancel_batch(session: Session, batch_id: str) -> bool:
    now = time.time()
    res = session.execute(
        update(Batch).where(Batch.id == batch_id, Batch.status.in_(("validating", "in_progress")))
        .values(status="cancelling", cancelling_at=now)
    )
    session.execute(
        update(Job).where(Job.batch_id == batch_id, Job.status.in_(ACTIVE))
        .values(**_cancel_values(now, "batch_cancelled", "the batch was cancelled before this request finished"))
    )
    return res.rowcount > 0  # type: ignore[attr-defined]


def has_active_jobs(session: Session, batch_id: str) -> bool:
    q = select(Job.id).where(Job.batch_id == batch_id, Job.status.in_(ACTIVE)).limit(1)
    return session.execute(q).first() is not None


def is_cancelled(session: Session, job_id: str) -> bool:
    return session.execute(select(Job.status).where(Job.id == job_id)).scalar() == "cancelled"


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
               result: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
               output_key: str | None = None) -> bool:
    """Record the outcome, only if this worker still holds the job (not cancelled, not re-leased)."""
    assert status in TERMINAL_JOB_STATUSES
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
        .values(status=status, result=result, error=error, output_key=output_key,
                finished_at=time.time(), lease_expires_at=None,
                progress=1.0 if status == "succeeded" else Job.progress)
    )
    return res.rowcount > 0  # type: ignore[attr-defined]


def release_job(session: Session, job_id: str, *, worker: str) -> bool:
    """Hand a running job back to the queue (a worker stopping mid-job). Its message is gone, so
    it counts as unpublished: the outbox sweeper sends it again."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
        .values(status="queued", worker=None, lease_expires_at=None, progress=0.0, published_at=None)
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
                error={"code": "worker_lost",
                       "message": f"the worker running this job stopped {attempts} times; giving up"}))
            if res.rowcount:  # type: ignore[attr-defined]
                failed.append(job_id)
        else:
            # Unpublished until the caller's publish succeeds; if it fails the outbox sweeper sends it.
            res = session.execute(update(Job).where(*guard).values(
                status="queued", worker=None, lease_expires_at=None, progress=0.0, published_at=None))
            if res.rowcount:  # type: ignore[attr-defined]
                publish.append(Publish(job_id, model, priority))
    return publish, failed
