"""Batches: bulk submit (inline requests or NDJSON), list, read, per-job listing, results, cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select

from services.body import batch_error, ndjson_lines, parse_json_body, read_body
from services.deps import RendererDep, SessionDep, StateDep, TenantDep
from services.errors import APIError, not_found
from shared import jobs as jobs_data
from shared.db import Batch, Job
from shared.finalize import maybe_finalize_batch
from shared.schemas import JOB_STATUSES, TERMINAL_JOB_STATUSES, BatchCreate
from shared.validation import validate_batch
from shared.views import batch_object, job_object, output_line

router = APIRouter(prefix="/v1/batches", tags=["batches"])

Limit = Annotated[int, Query(ge=1, le=1000)]


def load_batch(session: SessionDep, batch_id: str, tenant: str | None) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant != tenant:
        raise not_found("batch", batch_id)
    return batch


def batch_view(session: SessionDep, batch: Batch) -> dict[str, Any]:
    return batch_object(batch, jobs_data.request_counts(batch, jobs_data.batch_counts(session, batch.id)))


def _parse_submission(raw: bytes, content_type: str) -> tuple[list[tuple[int, Any]], BatchCreate]:
    if content_type.startswith(("application/x-ndjson", "application/jsonl", "application/json-lines")):
        return ndjson_lines(raw), BatchCreate()
    obj = parse_json_body(raw)
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_request")
    try:
        spec = BatchCreate.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}", code="invalid_request", param=param) from None
    if spec.input_file_id is not None:
        raise APIError(400, "input_file_id needs the Files API, which this server does not offer yet; "
                       "send the lines inline as `requests` or as an application/x-ndjson body",
                       code="unsupported", param="input_file_id")
    if spec.requests is None:
        raise APIError(400, "give `requests` (a list of request lines) or an application/x-ndjson body",
                       code="invalid_request", param="requests")
    return list(enumerate(spec.requests, start=1)), spec


@router.post("", status_code=202)
async def create_batch(request: Request, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Validate every line, record the batch and its jobs in bulk, then publish each job."""
    raw = await read_body(request, state.limits.max_body_bytes)
    numbered, spec = _parse_submission(raw, request.headers.get("content-type", ""))

    def _create() -> dict[str, Any]:
        lines, errors = validate_batch(numbered, state.registry, max_lines=state.limits.max_batch_lines,
                                       endpoint=spec.endpoint)
        if errors:
            raise batch_error(errors)
        endpoint = spec.endpoint or lines[0].request.url
        if any(v.request.url != endpoint for v in lines):
            endpoint = "mixed"
        batch, to_publish = jobs_data.create_batch(
            session, lines=lines, endpoint=endpoint, tenant=tenant,
            completion_window=spec.completion_window, metadata=spec.metadata)
        session.commit()
        state.publisher.publish(to_publish)
        return batch_object(batch, jobs_data.request_counts(batch, {"queued": len(lines)}))

    return await run_in_threadpool(_create)


@router.get("")
def list_batches(session: SessionDep, tenant: TenantDep, limit: Limit = 20,
                 after: str | None = None) -> dict[str, Any]:
    """Newest first; `after` is the last id of the previous page."""
    q = select(Batch).where(Batch.tenant == tenant if tenant else Batch.tenant.is_(None))
    if after:
        q = q.where(Batch.id < after)
    rows = session.execute(q.order_by(Batch.id.desc()).limit(limit + 1)).scalars().all()
    data = [batch_view(session, b) for b in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


@router.get("/{batch_id}")
def get_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return batch_view(session, load_batch(session, batch_id, tenant))


@router.get("/{batch_id}/jobs")
def list_batch_jobs(batch_id: str, session: SessionDep, tenant: TenantDep, renderer: RendererDep, limit: Limit = 100,
                    after: str | None = None, status: str | None = None) -> dict[str, Any]:
    """The batch's jobs in input order; `after` is the last job id of the previous page."""
    load_batch(session, batch_id, tenant)
    if status is not None and status not in JOB_STATUSES:
        raise APIError(400, f"status must be one of {', '.join(JOB_STATUSES)}", code="invalid_request",
                       param="status")
    q = select(Job).where(Job.batch_id == batch_id)
    if status:
        q = q.where(Job.status == status)
    if after:
        prev = session.get(Job, after)
        if prev is None or prev.batch_id != batch_id:
            raise APIError(400, f"after: no job {after!r} in this batch", code="invalid_request", param="after")
        q = q.where(Job.seq > prev.seq)
    rows = session.execute(q.order_by(Job.seq).limit(limit + 1)).scalars().all()
    data = [job_object(j, renderer.render(j)) for j in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


@router.get("/{batch_id}/results")
def batch_results(batch_id: str, state: StateDep, session: SessionDep, tenant: TenantDep,
                  renderer: RendererDep) -> StreamingResponse:
    """JSONL, one line per finished request, in input order (read live from the database)."""
    load_batch(session, batch_id, tenant)

    def lines() -> Iterator[bytes]:
        with state.sessions() as s:
            q = (select(Job).where(Job.batch_id == batch_id, Job.status.in_(TERMINAL_JOB_STATUSES))
                 .order_by(Job.seq).execution_options(yield_per=1000))
            for job in s.execute(q).scalars():
                line = output_line(job, renderer.render(job))
                yield (json.dumps(line, separators=(",", ":")) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/jsonl")


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel every job not yet finished; the batch ends `cancelled` with its partial output."""
    batch = load_batch(session, batch_id, tenant)
    jobs_data.cancel_batch(session, batch.id)
    session.commit()
    maybe_finalize_batch(state.sessions, state.storage, batch.id)
    session.refresh(batch)
    return batch_view(session, batch)
