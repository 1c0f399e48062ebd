"""Synchronous convenience endpoints in OpenAI's shape: the request becomes a job on the model's
queue and the answer waits for it, with bounded waits and a clear error instead of a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from genq.services import submit
from genq.services.body import model_schema, parse_json_body, read_body, request_body_doc
from genq.services.deps import RendererDep, SessionDep, StateDep, TenantDep
from genq.services.errors import APIError, error_response
from genq.services.resources import Once, create_once, get_owned
from genq.services.state import AppState
from genq.services.streaming import POLL_S, ChunkWriter, cancel, first_text, read_job, stream_response
from genq.shared.db import Job, tenant_key
from genq.shared.errors import job_failure
from genq.shared.kinds import ENDPOINTS, Endpoint
from genq.shared.schemas import TERMINAL_JOB_STATUSES

router = APIRouter(tags=["synchronous"])
FIRST_POLL_S = 0.02  # the first re-read of a waiting job; each next one 1.5 times later, up to POLL_S
Seconds = Annotated[float | None, Query(gt=0, le=3600)]
# Waiting on the queue can end without an answer; both are reported in the error shape.
WAIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: error_response("No worker took the job within `start_timeout` (code `no_worker_available`); "
                        "the job was cancelled"),
    504: error_response("The job did not end within `timeout` (code `timeout`); follow it by `job_id`"),
}


async def _wait(state: AppState, job_id: str, start_timeout: float, timeout: float, *,
                started: bool = False) -> Job:
    """Poll the job until it ends (or with `started`, until a worker has it); cancel it if no
    worker takes it within `start_timeout`. Each read is a short session in a worker thread, so
    between reads the wait holds no thread and no database connection."""
    began = time.monotonic()
    delay = FIRST_POLL_S
    while True:
        job = await run_in_threadpool(read_job, state, job_id)
        waited = time.monotonic() - began
        if job.status in TERMINAL_JOB_STATUSES or (started and job.status != "queued"):
            return job
        if job.status == "queued" and waited > start_timeout:
            if await run_in_threadpool(cancel, state, job_id):
                raise APIError(503, f"no worker took the job within {start_timeout:g}s: is a worker serving "
                               f"model {job.model!r} (queue genq.{job.model}) running? The job {job_id} "
                               "was cancelled.", code="no_worker_available", param="model")
            continue  # a worker took it just now
        if waited > timeout:
            raise APIError(504, f"job {job_id} is still {job.status} after {timeout:g}s; follow it at "
                           f"/v1/jobs/{job_id}", code="timeout", extra={"job_id": job_id})
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, POLL_S)


def _answer(job: Job, renderer: RendererDep) -> dict[str, Any]:
    if job.status == "succeeded":
        return renderer.render(job) or {}
    if job.status == "cancelled":
        raise APIError(409, f"job {job.id} was cancelled", code="cancelled")
    status, failure = job_failure(job.error)  # as in the job's batch output line
    raise APIError(status, failure["message"], code=failure["code"], param=failure["param"],
                   extra={"job_id": job.id})


async def _serve(url: str, request: Request, state: StateDep, session: SessionDep, tenant: TenantDep,
                 renderer: RendererDep, start_timeout: float | None, timeout: float | None) -> Any:
    raw = await read_body(request, state.limits.max_body_bytes)
    body = await run_in_threadpool(parse_json_body, raw, "body")  # off the event loop, as big as it may be
    stream = isinstance(body, dict) and body.get("stream") is True
    start_s = start_timeout or state.limits.sync_start_timeout_s
    total_s = timeout or state.limits.sync_timeout_s
    began = time.monotonic()

    def create(once: Once) -> str:
        return submit.one_job(state, session, tenant, {"url": url, "body": body}, once, stream=stream).id

    def replay(job_id: str) -> str:
        return get_owned(session, Job, job_id, tenant, "job").id

    # Until the answer starts (for a stream, its first text), the request holds a place of its tenant's.
    async with state.sync_waits.hold(tenant_key(tenant), state.limits.max_sync_waits_per_tenant):
        job_id = await create_once(request, session, tenant, "job", [raw], create, replay)
        await run_in_threadpool(session.close)  # the request's connection goes back to the pool now
        job = await _wait(state, job_id, start_s, total_s, started=stream)
        if not stream or job.status in ("failed", "cancelled"):
            return await run_in_threadpool(_answer, job, renderer)  # an error before any text is plain JSON
        job = await first_text(state, job, began + total_s)
    if job.status in ("failed", "cancelled"):
        _answer(job, renderer)  # raises: the worker refused or lost it before any text
    spec = state.registry.get(job.model)
    options = body.get("stream_options") or {}
    writer = ChunkWriter(job, spec.fingerprint if spec else "", _choices(body),
                         bool(isinstance(options, dict) and options.get("include_usage")), _echoed(body))
    return stream_response(state, renderer, job, writer, began + total_s)


def _choices(body: dict[str, Any]) -> int:
    """How many choices a (validated) text body asks for: n per prompt."""
    prompt = body.get("prompt")
    return (body.get("n") or 1) * (len(prompt) if isinstance(prompt, list) else 1)


def _echoed(body: dict[str, Any]) -> list[str]:
    """Each choice's prompt, for a completion with `echo` (its text starts with the prompt)."""
    if not body.get("echo"):
        return []
    prompt = body.get("prompt")
    return [p for p in (prompt if isinstance(prompt, list) else [prompt]) for _ in range(body.get("n") or 1)]


def _route(endpoint: Endpoint) -> Callable[..., Awaitable[Any]]:
    async def serve(request: Request, state: StateDep, session: SessionDep, tenant: TenantDep,
                    renderer: RendererDep, start_timeout: Seconds = None, timeout: Seconds = None) -> Any:
        return await _serve(endpoint.url, request, state, session, tenant, renderer, start_timeout, timeout)

    serve.__name__ = endpoint.operation
    serve.__doc__ = (f"{endpoint.summary} (`start_timeout`, `timeout`: seconds to wait for a worker to take "
                     "the job, and in all).")
    return serve


# One synchronous route per endpoint of the table of kinds, at the endpoint's own url.
for _endpoint in ENDPOINTS.values():
    router.add_api_route(_endpoint.url, _route(_endpoint), methods=["POST"], responses=WAIT_RESPONSES,
                         openapi_extra=request_body_doc(model_schema(_endpoint.body)))
