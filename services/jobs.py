"""Creating and cancelling jobs and batches (the API's side of job state). Cancels are guarded
UPDATEs, so a worker finishing at the same moment keeps its outcome or loses it whole."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from genq.services.validation import ValidLine
from genq.shared.broker import Publish
from genq.shared.db import Batch, Job, new_id
from genq.shared.errors import ErrorCode, job_error
from genq.shared.jobs import ACTIVE
from genq.shared.requests import effective_priority, window_seconds


def _job_row(v: ValidLine, *, tenant: str | None, batch_id: str | None, seq: int, now: float,
             priority: int | None) -> dict[str, Any]:
    """A job's row; `priority` is its batch's, which the line's own overrides."""
    return {
        "id": new_id("job"), "batch_id": batch_id, "seq": seq, "tenant": tenant,
        "custom_id": v.request.custom_id, "url": v.request.url, "model": v.body.model,
        "requested_model": v.requested_model, "body": v.body.model_dump(exclude_unset=True),
        "priority": effective_priority(v.request.priority, priority),
        "webhook_url": v.request.webhook_url, "webhook_events": v.request.webhook_events,
        "status": "queued", "progress": 0.0, "attempts": 0, "created_at": now,
    }


def request_body(job: Job) -> dict[str, Any]:
    """The job's body as its request wrote it (what a retry validates again): a fine-tuned model's
    name in place of the base model and adapter it runs on, so a retry finds the model anew."""
    if job.requested_model is None:
        return job.body
    return {**{k: v for k, v in job.body.items() if k != "adapter"}, "model": job.requested_model}


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


def hold_validation(session: Session, batch_id: str, *, lease_s: float, renew: bool = False) -> bool:
    """Take (or with `renew`, extend) the lease on a `validating` batch's validation. Taking it
    succeeds only if no live process holds it, so one API process validates a batch at a time."""
    now = time.time()
    free = Batch.validating_until.is_not(None) if renew else (
        Batch.validating_until.is_(None) | (Batch.validating_until < now))
    res = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "validating", free)
                          .values(validating_until=now + lease_s))
    return res.rowcount > 0  # type: ignore[attr-defined]


def fail_validation(session: Session, batch_id: str, errors: list[dict[str, Any]]) -> bool:
    """OpenAI's behaviour: a batch with invalid input fails whole, listing each line's problem."""
    res = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "validating").values(
        status="failed", failed_at=time.time(), errors={"object": "list", "data": errors}))
    return res.rowcount > 0  # type: ignore[attr-defined]


# --- cancellation ---------------------------------------------------------------------------

def _cancel_values(now: float, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"status": "cancelled", "finished_at": now, "lease_expires_at": None, "error": job_error(code, message)}


def cancel_job(session: Session, job_id: str) -> bool:
    """Cancel a queued or running job; a running worker notices and discards its work."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(**_cancel_values(time.time(), ErrorCode.CANCELLED, "cancelled by request"))
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
        .values(**_cancel_values(now, ErrorCode.BATCH_CANCELLED,
                                 "the batch was cancelled before this request finished"))
    )
    return res.rowcount > 0  # type: ignore[attr-defined]


