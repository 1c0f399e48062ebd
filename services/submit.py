"""What every submission path shares: the adapters a tenant may name (for validation), and once
its jobs are recorded, admission (quotas) and publishing to the broker."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from genq.services import jobs as records
from genq.services.adapters import AdapterCatalog
from genq.services.body import batch_error
from genq.services.guards import check_queue_ceiling
from genq.services.resources import Once
from genq.services.state import AppState
from genq.services.validation import validate_line
from genq.shared import outbox
from genq.shared.broker import Publish
from genq.shared.db import Job


def adapters(state: AppState, session: Session, tenant: str | None) -> AdapterCatalog:
    """The adapters `tenant` may name in requests (its uploads and the registry's), for
    validate_line / validate_batch; the uploads are read on first use only."""
    return AdapterCatalog(session, state.registry, tenant)


def admit(state: AppState, session: Session, tenant: str | None, jobs: int) -> None:
    """Raise an APIError (429) if this tenant may not queue `jobs` more jobs now."""
    check_queue_ceiling(session, tenant, jobs, state.limits.max_queued_jobs)


def publish(state: AppState, items: list[Publish]) -> None:
    """Hand committed jobs to the broker and mark them published. A broker outage does not fail
    the submission: the jobs stay unpublished and the outbox sweeper sends them later."""
    outbox.publish_and_mark(state.sessions, state.publisher, items)


def one_job(state: AppState, session: Session, tenant: str | None, line_obj: Any, once: Once, *,
            stream: bool = False) -> Job:
    """Every single-job path (POST /v1/jobs, the synchronous endpoints): validate the request line
    (400 naming the field), admit it (429 over the quota), record the job with the request's
    idempotency key, commit, publish. `stream`: the caller streams the answer (`stream: true`)."""
    line, errors = validate_line(line_obj, None, state.registry, max_prompt_chars=state.limits.max_prompt_chars,
                                 adapters=adapters(state, session, tenant), stream=stream,
                                 webhook_policy=state.webhook_policy)
    if line is None:
        raise batch_error(errors)
    admit(state, session, tenant, 1)
    job, item = records.create_job(session, line=line, tenant=tenant)
    once.remember(job.id)
    session.commit()
    publish(state, [item])
    return job
