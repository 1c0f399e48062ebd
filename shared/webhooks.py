"""Webhook events: which objects subscribed to which events, and queueing a delivery.

A state change only inserts a `WebhookDelivery` row inside its own transaction (an outbox), so a
GPU worker never waits on someone else's HTTP server; the API's dispatcher
(genq.services.webhooks) sends the rows.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.shared.db import Batch, FineTuningJob, Job, WebhookDelivery, new_id
from genq.shared.jobs import batch_counts, request_counts
from genq.shared.results import as_requested, stored_result
from genq.shared.schemas import DEFAULT_EVENTS, EVENTS
from genq.shared.views import batch_object, fine_tuning_job_object, job_object

JOB_STATUS_EVENTS = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
BATCH_STATUS_EVENTS = {"completed": "completed", "failed": "failed", "cancelled": "cancelled", "expired": "expired"}
PROGRESS_STATUSES = ("in_progress", "finalizing")
# A fine-tuning job's events, sent as `fine_tuning.job.<event>` (OpenAI's names for the first three).
FINE_TUNING_EVENTS = ("succeeded", "failed", "cancelled", "progress")
FINE_TUNING_DEFAULT_EVENTS = ("succeeded", "failed", "cancelled")


def _enqueue(session: Session, *, tenant: str | None, url: str, kind: str, object_id: str,
             data: dict[str, Any]) -> WebhookDelivery:
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
    delivery = WebhookDelivery(
        id=new_id("msg"), tenant=tenant, url=url, event=kind, object_id=object_id,
        payload={"type": kind, "timestamp": stamp, "data": data},
        status="pending", attempts=0, next_attempt_at=now, created_at=now)
    session.add(delivery)
    return delivery


def _wants(url: str | None, events: list[str] | None, event: str) -> bool:
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    return bool(url) and event in (DEFAULT_EVENTS if events is None else events)


def enqueue_job_event(session: Session, job: Job, event: str, *,
                      result: dict[str, Any] | None = None) -> WebhookDelivery | None:
    """Queue `job.<event>` if the job subscribed to it. Batch jobs inherit nothing: the batch reports."""
    if not _wants(job.webhook_url, job.webhook_events, event):
        return None
    assert job.webhook_url is not None
    return _enqueue(session, tenant=job.tenant, url=job.webhook_url, kind=f"job.{event}", object_id=job.id,
                    data=job_object(job, stored_result(job) if result is None else as_requested(job, result)))


def enqueue_batch_event(session: Session, batch: Batch, event: str,
                        request_counts: dict[str, int] | None = None) -> WebhookDelivery | None:
    """Queue `batch.<event>` if the batch subscribed to it (counts computed when not given)."""
    if not _wants(batch.webhook_url, batch.webhook_events, event):
        return None
    assert batch.webhook_url is not None
    if request_counts is None:
        request_counts = counts(session, batch)
    return _enqueue(session, tenant=batch.tenant, url=batch.webhook_url, kind=f"batch.{event}",
                    object_id=batch.id, data=batch_object(batch, request_counts))


def counts(session: Session, batch: Batch) -> dict[str, int]:
    return request_counts(batch_counts(session, batch.id))


def notify_job(session: Session, job_id: str) -> WebhookDelivery | None:
    """After a job reached a terminal status in this transaction: queue its event, if wanted."""
    job = session.get(Job, job_id, populate_existing=True)
    event = JOB_STATUS_EVENTS.get(job.status) if job else None
    return enqueue_job_event(session, job, event) if job and event else None


def notify_jobs(session: Session, job_ids: list[str]) -> list[WebhookDelivery]:
    """notify_job for many jobs in one query, which reads only the jobs that have a webhook."""
    if not job_ids:
        return []
    jobs = session.scalars(select(Job).where(Job.id.in_(job_ids), Job.webhook_url.is_not(None))
                           .execution_options(populate_existing=True))
    queued = (enqueue_job_event(session, job, event) for job in jobs
              if (event := JOB_STATUS_EVENTS.get(job.status)))
    return [d for d in queued if d is not None]


def notify_batch(session: Session, batch_id: str) -> WebhookDelivery | None:
    """After a batch reached a terminal status in this transaction: queue its event, if wanted."""
    batch = session.get(Batch, batch_id, populate_existing=True)
    event = BATCH_STATUS_EVENTS.get(batch.status) if batch else None
    return enqueue_batch_event(session, batch, event) if batch and event else None


def notify_fine_tuning(session: Session, job_id: str, event: str, *,
                       metrics: dict[str, Any] | None = None) -> WebhookDelivery | None:
    """Queue `fine_tuning.job.<event>` if the job subscribed to it (in the caller's transaction,
    after the change it reports): the job object, with the step's `metrics` for `progress`."""
    if event not in FINE_TUNING_EVENTS:
        raise ValueError(f"unknown fine-tuning webhook event {event!r}")
    job = session.get(FineTuningJob, job_id, populate_existing=True)
    if job is None or not job.webhook_url:
        return None
    if event not in (FINE_TUNING_DEFAULT_EVENTS if job.webhook_events is None else job.webhook_events):
        return None
    data = fine_tuning_job_object(job)
    if metrics is not None:
        data = {**data, "metrics": metrics}
    return _enqueue(session, tenant=job.tenant, url=job.webhook_url, kind=f"fine_tuning.job.{event}",
                    object_id=job.id, data=data)
