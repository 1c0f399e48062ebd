"""Single jobs: submit, read, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy.orm import Session

from genq.services import jobs as jobs_data
from genq.services import submit
from genq.services.body import (
    parse_json_body,
    read_body,
    refuse_nul_params,
    request_body_doc,
    request_line_schema,
)
from genq.services.deps import RendererDep, SessionDep, StateDep, TenantDep
from genq.services.errors import APIError
from genq.services.objects import JobObject
from genq.services.resources import Once, create_once, get_owned, read_once
from genq.shared.db import Job
from genq.shared.finalize import maybe_finalize_batch
from genq.shared.views import job_object
from genq.shared.webhooks import notify_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(refuse_nul_params)])


def load_job(session: Session, job_id: str, tenant: str | None) -> Job:
    return get_owned(session, Job, job_id, tenant, "job")


@router.post("", status_code=202, response_model=JobObject, openapi_extra=request_body_doc(request_line_schema()))
async def submit_job(request: Request, state: StateDep, session: SessionDep, tenant: TenantDep,
                     renderer: RendererDep) -> dict[str, Any]:
    """Submit one request line; answers 202 with the queued job."""
    raw = await read_body(request, state.limits.max_body_bytes)
    obj = await run_in_threadpool(parse_json_body, raw)  # a big body is parsed off the event loop

    def create(once: Once) -> dict[str, Any]:
        return job_object(submit.one_job(state, session, tenant, obj, once))

    def replay(job_id: str) -> dict[str, Any]:
        job = load_job(session, job_id, tenant)
        return job_object(job, renderer.render(job))

    return await create_once(request, session, tenant, "job", [raw], create, replay)


@router.get("/{job_id}", response_model=JobObject)
async def get_job(job_id: str, state: StateDep, tenant: TenantDep, renderer: RendererDep) -> dict[str, Any]:
    def read(session: Session) -> dict[str, Any]:
        job = load_job(session, job_id, tenant)
        return job_object(job, renderer.render(job))

    return await read_once(state.sessions, read)


@router.get("/{job_id}/outputs/{name}", response_class=Response,
            responses={200: {"description": "The output's bytes",
                             "content": {"image/png": {}, "application/octet-stream": {}}}})
def get_output(job_id: str, name: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> Response:
    """The bytes of one output (an image) of a succeeded job, authorised like the job itself."""
    job = load_job(session, job_id, tenant)
    keys = (job.result or {}).get("output_keys", [])
    key = next((k for k in keys if k and k.rsplit("/", 1)[-1] == name), None)
    if job.status != "succeeded" or key is None:
        raise APIError(404, f"job {job_id} has no output {name!r}", code="not_found", param="name")
    media = "image/png" if name.endswith(".png") else "application/octet-stream"
    return Response(state.storage.get(key), media_type=media)


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, state: StateDep, session: SessionDep, tenant: TenantDep,
               renderer: RendererDep) -> dict[str, Any]:
    """Cancel a queued or running job. Cancelling a finished job changes nothing (idempotent)."""
    job = load_job(session, job_id, tenant)
    if jobs_data.cancel_job(session, job.id):
        notify_job(session, job.id)
    session.commit()
    if job.batch_id:
        maybe_finalize_batch(state.sessions, state.storage, job.batch_id)
    session.refresh(job)
    return job_object(job, renderer.render(job))
