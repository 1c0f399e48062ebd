"""Synchronous convenience endpoints in OpenAI's shape: the request becomes a job on the model's
queue and the answer waits for it, with bounded waits and a clear error instead of a hang."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from genq.services import jobs as jobs_data
from genq.services import submit
from genq.services.body import model_schema, parse_json_body, read_body, request_body_doc
from genq.services.deps import RendererDep, SessionDep, StateDep, TenantDep
from genq.services.errors import APIError, error_response
from genq.services.resources import Once, create_once, get_owned
from genq.services.streaming import ChunkWriter, first_text, stream_response
from genq.shared.db import Job
from genq.shared.errors import job_failure
from genq.shared.kinds import ENDPOINTS, Endpoint
from genq.shared.schemas import TERMINAL_JOB_STATUSES

router = APIRouter(tags=["synchronous"])
Seconds = Annotated[float | None, Query(gt=0, le=3600)]
# Waiting on the queue can end without an answer; both are reported in the error shape.
WAIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: error_response("No worker took the job within `start_timeout` (code `no_worker_available`); "
                        "the job was cancelled"),
    504: error_response("The job did not end within `timeout` (code `timeout`); follow it by `job_id`"),
}


def _wait(state: Any, session: Any, job_id: str, start_timeout: float, timeout: float, *,
          started: bool = False) -> Job:
    """Poll the job until it ends (or with `started`, until a worker has it); cancel it if no
    worker takes it within `start_timeout`."""
    began = time.monotonic()
    delay = 0.02
    while True:
        session.expire_all()
        job = session.get(Job, job_id)
        assert job is not None
        waited = time.monotonic() - began
        if job.status in TERMINAL_JOB_STATUSES or (started and job.status != "queued"):
            return job
        if job.status == "queued" and waited > start_timeout:
            if jobs_data.cancel_job(session, job_id):
                session.commit()
                raise APIError(503, f"no worker took the job within {start_timeout:g}s: is a worker serving "
                               f"model {job.model!r} (queue genq.{job.model}) running? The job {job_id} "
                               "was cancelled.", code="no_worker_available", param="model")
            continue  # a worker took it just now
        if waited > timeout:
            raise APIError(504, f"job {job_id} is still {job.status} after {timeout:g}s; follow it at "
                           f"/v1/jobs/{job_id}", code="timeout", extra={"job_id": job_id})
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


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
    body = parse_json_body(raw, prefix="body")
    stream = isinstance(body, dict) and body.get("stream") is True
    start_s = start_timeout or state.limits.sync_start_timeout_s
    total_s = timeout or state.limits.sync_timeout_s
    began = time.monotonic()

    def answer(job_id: str) -> Any:
        done = _wait(state, session, job_id, start_s, total_s, started=stream)
        if not stream or done.status in ("failed", "cancelled"):
            return _answer(done, renderer)  # an error before any text is a plain JSON error
        return done

    def create(once: Once) -> Any:
        return answer(submit.one_job(state, session, tenant, {"url": url, "body": body}, once, stream=stream).id)

    def replay(job_id: str) -> Any:
        get_owned(session, Job, job_id, tenant, "job")
        return answer(job_id)

    outcome = await create_once(request, session, tenant, "job", [raw], create, replay)
    if not stream:
        return outcome
    job: Job = outcome
    session.expunge(job)
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
