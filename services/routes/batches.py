"""Batches: bulk submit (inline requests or NDJSON), list, read, per-job listing, results, cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.services import jobs as jobs_data
from genq.services import submit
from genq.services.body import (
    NUL_MESSAGE,
    batch_error,
    has_nul,
    model_schema,
    parse_json_body,
    read_body,
    refuse_nul_params,
    request_body_doc,
    request_line_schema,
)
from genq.services.deps import RendererDep, SessionDep, StateDep, TenantDep
from genq.services.errors import APIError
from genq.services.intake import validate_file_batch
from genq.services.ndjson import validate_ndjson
from genq.services.objects import BatchObject, JobObject, Page
from genq.services.resources import Once, create_once, cursor_page, get_owned, list_page, read_once
from genq.services.validation import ValidLine, validate_batch
from genq.services.webhooks import validate_subscription
from genq.shared import jobs as job_state
from genq.shared.db import Batch, File, Job, owned_by
from genq.shared.finalize import maybe_finalize_batch
from genq.shared.requests import METADATA_MAX_PAIRS, BatchCreate, Metadata
from genq.shared.schemas import JOB_STATUSES, TERMINAL_JOB_STATUSES
from genq.shared.views import batch_object, job_object, output_line

router = APIRouter(prefix="/v1/batches", tags=["batches"], dependencies=[Depends(refuse_nul_params)])

Limit = Annotated[int, Query(ge=1, le=1000)]


def load_batch(session: Session, batch_id: str, tenant: str | None) -> Batch:
    return get_owned(session, Batch, batch_id, tenant, "batch")


def batch_view(session: Session, batch: Batch) -> dict[str, Any]:
    return batch_object(batch, job_state.request_counts(job_state.batch_counts(session, batch.id)))


NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")


def _parse_submission(raw: bytes) -> BatchCreate:
    """A JSON body's batch (run in a worker thread: parsing a large body is CPU-bound)."""
    obj = parse_json_body(raw)
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_request")
    try:
        spec = BatchCreate.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {msg}", code="invalid_request", param=param) from None
    for name in ("input_file_id", "webhook_url"):
        if has_nul(getattr(spec, name)):
            raise APIError(400, f"{name}: {NUL_MESSAGE}", code="invalid_request", param=name)
    if spec.input_file_id is not None:
        if spec.requests is not None:
            raise APIError(400, "give either `requests` or `input_file_id`, not both", param="input_file_id",
                           code="invalid_request")
        if spec.endpoint is None:
            raise APIError(400, "endpoint is required with input_file_id", code="invalid_request", param="endpoint")
    elif spec.requests is None:
        raise APIError(400, "give `requests` (a list of request lines), an application/x-ndjson body, "
                       "or `input_file_id`", code="invalid_request", param="requests")
    else:
        spec.requests = list(enumerate(spec.requests, start=1))
    return spec


def _batch_fields(state: StateDep, spec: BatchCreate) -> dict[str, Any]:
    try:
        url, events = validate_subscription(spec.webhook_url, spec.webhook_events, state.webhook_policy)
    except ValueError as exc:
        raise APIError(400, f"webhook: {exc}", code="invalid_request", param="webhook_url") from None
    return {"completion_window": spec.completion_window, "meta": spec.metadata, "priority": spec.priority,
            "webhook_url": url, "webhook_events": events}


def _start(state: StateDep, session: SessionDep, tenant: str | None, once: Once, lines: list[ValidLine], *,
           endpoint: str, **fields: Any) -> dict[str, Any]:
    """Admit validated lines (429 over the quota), record the batch and its jobs with the request's
    idempotency key, commit and publish; the new batch's object."""
    submit.admit(state, session, tenant, len(lines))
    batch, to_publish = jobs_data.create_batch(session, lines=lines, endpoint=endpoint, tenant=tenant, **fields)
    once.remember(batch.id)
    session.commit()
    submit.publish(state, to_publish)
    return batch_object(batch, job_state.request_counts({"queued": len(lines)}))


def _batch_create_schema() -> dict[str, Any]:
    schema = model_schema(BatchCreate)
    lines = {"type": "array", "items": request_line_schema(batch=True), "minItems": 1}
    schema["properties"]["requests"] = {**lines, "title": "Requests"}
    schema["anyOf"] = [{"required": ["requests"]}, {"required": ["input_file_id", "endpoint"]}]
    return schema


@router.post("", status_code=202, response_model=BatchObject,
             openapi_extra=request_body_doc(_batch_create_schema(), ndjson=request_line_schema(batch=True)))
async def create_batch(request: Request, background: BackgroundTasks, state: StateDep, session: SessionDep,
                       tenant: TenantDep) -> dict[str, Any]:
    """Inline or NDJSON lines are validated now (400 naming each bad line) and queued; a batch of
    an uploaded file answers `validating` at once and is checked in the background."""
    raw = await read_body(request, state.limits.max_body_bytes)
    # An NDJSON body carries lines only: it is counted, parsed and validated in `create`, in a thread.
    ndjson = request.headers.get("content-type", "").startswith(NDJSON_TYPES)
    spec = BatchCreate() if ndjson else await run_in_threadpool(_parse_submission, raw)

    def create(once: Once) -> dict[str, Any]:
        fields = _batch_fields(state, spec)
        if spec.input_file_id is not None:
            file = get_owned(session, File, spec.input_file_id, tenant, "file")
            if file.purpose != "batch":
                raise APIError(400, f"file {file.id} has purpose {file.purpose!r}, not 'batch'",
                               code="invalid_request", param="input_file_id")
            batch = jobs_data.new_batch(session, endpoint=spec.endpoint or "", tenant=tenant, status="validating",
                                        input_file_id=file.id, **fields)
            once.remember(batch.id)
            session.commit()
            background.add_task(validate_file_batch, state, batch.id)
            return batch_object(batch, job_state.request_counts({}))
        check = partial(validate_ndjson, raw) if ndjson else partial(validate_batch, spec.requests or [])
        lines, errors = check(state.registry, max_lines=state.limits.max_batch_lines, endpoint=spec.endpoint,
                              max_prompt_chars=state.limits.max_prompt_chars,
                              adapters=submit.adapters(state, session, tenant),
                              webhook_policy=state.webhook_policy)
        if errors:
            raise batch_error(errors)
        endpoint = spec.endpoint or lines[0].request.url
        if any(v.request.url != endpoint for v in lines):
            endpoint = "mixed"
        return _start(state, session, tenant, once, lines, endpoint=endpoint, **fields)

    return await create_once(request, session, tenant, "batch", [raw], create,
                             lambda batch_id: batch_view(session, load_batch(session, batch_id, tenant)))


@router.get("", response_model=Page[BatchObject])
def list_batches(session: SessionDep, tenant: TenantDep, limit: Limit = 20,
                 after: str | None = None) -> dict[str, Any]:
    """Newest first; `after` is the last id of the previous page."""
    return cursor_page(session, select(Batch).where(owned_by(Batch.tenant, tenant)), Batch.id, after=after,
                       limit=limit, view=lambda b: batch_view(session, b))


@router.get("/{batch_id}", response_model=BatchObject)
async def get_batch(batch_id: str, state: StateDep, tenant: TenantDep) -> dict[str, Any]:
    return await read_once(state.sessions, lambda session: batch_view(session, load_batch(session, batch_id, tenant)))


@router.get("/{batch_id}/jobs", response_model=Page[JobObject])
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
    return list_page([job_object(j, renderer.render(j)) for j in rows[:limit]], len(rows) > limit)


@router.get("/{batch_id}/results", response_class=StreamingResponse,
            responses={200: {"description": "One JSON line per finished request, in input order",
                             "content": {"application/jsonl": {}}}})
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


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(batch_id: str, state: StateDep, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel every job not yet finished; the batch ends `cancelled` with its partial output."""
    batch = load_batch(session, batch_id, tenant)
    jobs_data.cancel_batch(session, batch.id)
    session.commit()
    maybe_finalize_batch(state.sessions, state.storage, batch.id)
    session.refresh(batch)
    return batch_view(session, batch)


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_cancelled: bool = False
    metadata: Metadata | None = None


@router.post("/{batch_id}/retry", status_code=202, response_model=BatchObject,
             openapi_extra=request_body_doc(model_schema(RetryRequest), required=False))
async def retry_batch(batch_id: str, request: Request, state: StateDep, session: SessionDep,
                      tenant: TenantDep) -> dict[str, Any]:
    """A new batch of the requests that failed (and, if asked, were cancelled), linked to this one
    by `metadata.retry_of`."""
    raw = await read_body(request, 64 * 1024)
    try:
        opts = RetryRequest.model_validate_json(raw) if raw.strip() else RetryRequest()
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}", code="invalid_request", param=param) from None

    def retry(once: Once) -> dict[str, Any]:
        original = load_batch(session, batch_id, tenant)
        statuses = ("failed", "cancelled") if opts.include_cancelled else ("failed",)
        jobs = session.execute(select(Job).where(Job.batch_id == batch_id, Job.status.in_(statuses))
                               .order_by(Job.seq)).scalars().all()
        if not jobs:
            raise APIError(400, f"batch {batch_id} has no {' or '.join(statuses)} requests to retry",
                           code="nothing_to_retry")
        numbered = [(i, {"custom_id": j.custom_id, "url": j.url, "body": jobs_data.request_body(j),
                         "priority": j.priority})
                    for i, j in enumerate(jobs, start=1)]
        lines, errors = validate_batch(numbered, state.registry, max_lines=state.limits.max_batch_lines,
                                       max_prompt_chars=state.limits.max_prompt_chars,
                                       adapters=submit.adapters(state, session, tenant))
        if errors:
            raise batch_error(errors)
        metadata = {**(original.meta or {}), **(opts.metadata or {}), "retry_of": original.id}
        if len(metadata) > METADATA_MAX_PAIRS:
            raise APIError(400, f"metadata: the retry's metadata (the batch's, this request's and retry_of) would "
                           f"hold {len(metadata)} pairs; at most {METADATA_MAX_PAIRS}", code="invalid_request",
                           param="metadata")
        return _start(state, session, tenant, once, lines, endpoint=original.endpoint,
                      completion_window=original.completion_window, meta=metadata, priority=original.priority,
                      webhook_url=original.webhook_url, webhook_events=original.webhook_events,
                      retry_of=original.id, input_file_id=original.input_file_id)

    return await create_once(request, session, tenant, "batch", [raw], retry,
                             lambda new_id: batch_view(session, load_batch(session, new_id, tenant)))
