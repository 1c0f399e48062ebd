"""OpenAI's fine-tuning API: create, list, read and cancel jobs, and list a job's events and
checkpoints. The training itself runs on workers (genq.workers.training), fed by
genq.services.fine_tuning.enqueue_fine_tune."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.services.body import model_schema, parse_json_body, read_body, refuse_nul_params, request_body_doc
from genq.services.deps import SessionDep, StateDep, TenantDep
from genq.services.errors import APIError
from genq.services.fine_tuning import create_job, enqueue_fine_tune
from genq.services.fine_tuning_events import follow_events
from genq.services.objects import FineTuningCheckpointObject, FineTuningEventObject, FineTuningJobObject, Page
from genq.services.resources import Once, create_once, cursor_page, get_owned, list_page
from genq.services.sse import last_event_id
from genq.services.validation import field_errors
from genq.shared import fine_tuning_jobs as ft_state
from genq.shared.db import FineTuningCheckpoint, FineTuningEvent, FineTuningJob, owned_by
from genq.shared.fine_tuning import FineTuningJobCreate
from genq.shared.requests import METADATA_MAX_PAIRS
from genq.shared.views import fine_tuning_checkpoint_object, fine_tuning_event_object, fine_tuning_job_object
from genq.shared.webhooks import notify_fine_tuning

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], dependencies=[Depends(refuse_nul_params)])

Limit = Annotated[int, Query(ge=1, le=100)]
MAX_CREATE_BODY_BYTES = 64 * 1024
_METADATA_PARAM = re.compile(r"metadata\[(.+)\]")


def load_job(session: Session, job_id: str, tenant: str | None) -> FineTuningJob:
    return get_owned(session, FineTuningJob, job_id, tenant, "fine-tuning job")


def _parse_create(raw: bytes) -> FineTuningJobCreate:
    obj = parse_json_body(raw)
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_request")
    try:
        return FineTuningJobCreate.model_validate(obj)
    except ValidationError as exc:
        first = field_errors(exc, FineTuningJobCreate)[0]
        raise APIError(400, first.as_dict()["message"], code=first.code, param=first.param) from None


@router.post("", response_model=FineTuningJobObject,
             openapi_extra=request_body_doc(model_schema(FineTuningJobCreate)))
async def create_fine_tuning_job(request: Request, state: StateDep, session: SessionDep,
                                 tenant: TenantDep) -> dict[str, Any]:
    """Check the body, the base model and every line of the files (400 naming the line and field),
    record the job `queued` and hand it to the training workers."""
    raw = await read_body(request, MAX_CREATE_BODY_BYTES)
    spec = _parse_create(raw)

    def create(once: Once) -> dict[str, Any]:
        job = create_job(state, session, spec, tenant)
        once.remember(job.id)
        session.commit()
        enqueue_fine_tune(state, job)
        return fine_tuning_job_object(job)

    return await create_once(request, session, tenant, "fine_tuning.job", [raw], create,
                             lambda job_id: fine_tuning_job_object(load_job(session, job_id, tenant)))


def _metadata_filter(request: Request) -> dict[str, str]:
    """`metadata[k]=v` query parameters (how the openai SDK sends `metadata={...}`)."""
    found = {m.group(1): v for k, v in request.query_params.multi_items() if (m := _METADATA_PARAM.fullmatch(k))}
    if len(found) > METADATA_MAX_PAIRS:
        raise APIError(400, f"metadata: at most {METADATA_MAX_PAIRS} pairs to filter on", code="invalid_request",
                       param="metadata")
    return found


@router.get("", response_model=Page[FineTuningJobObject])
def list_fine_tuning_jobs(request: Request, session: SessionDep, tenant: TenantDep, limit: Limit = 20,
                          after: str | None = None) -> dict[str, Any]:
    """Newest first; `after` is the last id of the previous page; `metadata[k]=v` keeps the jobs
    whose metadata has every such pair."""
    query = select(FineTuningJob).where(owned_by(FineTuningJob.tenant, tenant))
    wanted = _metadata_filter(request)
    if not wanted:
        return cursor_page(session, query, FineTuningJob.id, after=after, limit=limit, view=fine_tuning_job_object)
    # Compared here rather than in SQL: SQLite's JSON paths miss keys holding quotes or non-ASCII
    # characters, and a tenant's fine-tuning jobs are few enough to read through.
    if after:
        query = query.where(FineTuningJob.id < after)
    rows = session.execute(query.order_by(FineTuningJob.id.desc()).execution_options(yield_per=200)).scalars()
    matched: list[FineTuningJob] = []
    for job in rows:
        if all((job.meta or {}).get(k) == v for k, v in wanted.items()):
            matched.append(job)
            if len(matched) > limit:
                break
    return list_page([fine_tuning_job_object(j) for j in matched[:limit]], len(matched) > limit)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJobObject)
def get_fine_tuning_job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return fine_tuning_job_object(load_job(session, fine_tuning_job_id, tenant))


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJobObject)
def cancel_fine_tuning_job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """A job not started is `cancelled` at once; a running one stays `running` until its worker
    stops it at its next step; a finished one is answered unchanged."""
    job = load_job(session, fine_tuning_job_id, tenant)
    if ft_state.cancel(session, job.id) == "cancelled":
        notify_fine_tuning(session, job.id, "cancelled")  # a running job's worker sends it when it stops
    session.commit()
    session.refresh(job)
    return fine_tuning_job_object(job)


@router.get("/{fine_tuning_job_id}/events", response_model=Page[FineTuningEventObject],
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "A page of events; with stream=true, Server-Sent Events until "
                                            "the job ends"}})
def list_fine_tuning_events(fine_tuning_job_id: str, request: Request, state: StateDep, session: SessionDep,
                            tenant: TenantDep, limit: Limit = 20, after: str | None = None,
                            stream: bool = False) -> Any:
    """The job's events, newest first; `after` is the last event id of the previous page. With
    `stream=true`: every event oldest first, then new ones as they happen, until the job ends."""
    job = load_job(session, fine_tuning_job_id, tenant)
    if stream:
        session.close()  # a stream may last hours: it polls in sessions of its own, holding no connection between
        return follow_events(state.sessions, job.id, last_event_id(request))
    query = select(FineTuningEvent).where(FineTuningEvent.job_id == job.id)
    if after:
        prev = session.execute(select(FineTuningEvent).where(FineTuningEvent.id == after)).scalar_one_or_none()
        if prev is None or prev.job_id != job.id:
            raise APIError(400, f"after: no event {after!r} of this job", code="invalid_request", param="after")
        query = query.where(FineTuningEvent.seq < prev.seq)
    rows = session.execute(query.order_by(FineTuningEvent.seq.desc()).limit(limit + 1)).scalars().all()
    return list_page([fine_tuning_event_object(e) for e in rows[:limit]], len(rows) > limit)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=Page[FineTuningCheckpointObject])
def list_fine_tuning_checkpoints(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep,
                                 limit: Limit = 10, after: str | None = None) -> dict[str, Any]:
    """The job's checkpoints, latest step first; `after` is the last checkpoint id of the previous page."""
    job = load_job(session, fine_tuning_job_id, tenant)
    query = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job.id)
    if after:
        prev = session.get(FineTuningCheckpoint, after)
        if prev is None or prev.job_id != job.id:
            raise APIError(400, f"after: no checkpoint {after!r} of this job", code="invalid_request", param="after")
        query = query.where(FineTuningCheckpoint.step < prev.step)
    rows = session.execute(query.order_by(FineTuningCheckpoint.step.desc()).limit(limit + 1)).scalars().all()
    return list_page([fine_tuning_checkpoint_object(c, job) for c in rows[:limit]], len(rows) > limit)
