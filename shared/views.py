"""Public JSON shapes of jobs, batches and output lines (the contract's section 2)."""

from __future__ import annotations

from typing import Any

from genq.shared.db import Batch, File, Job
from genq.shared.errors import ErrorCode, job_failure
from genq.shared.registry import ModelSpec
from genq.shared.requests import effective_priority
from genq.shared.results import public_result


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def job_object(job: Job, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job as the API shows it; `result` is the rendered result (see shared.results)."""
    return {
        "id": job.id, "object": "job", "batch_id": job.batch_id, "custom_id": job.custom_id,
        "url": job.url, "model": job.model, "status": job.status,
        "priority": effective_priority(job.priority),
        "progress": round(job.progress or 0.0, 4), "attempts": job.attempts,
        "created_at": _ts(job.created_at), "started_at": _ts(job.started_at),
        "finished_at": _ts(job.finished_at), "error": job.error,
        "result": public_result(job.result) if result is None else result,
    }


def batch_object(batch: Batch, request_counts: dict[str, int]) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "errors": batch.errors, "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window, "status": batch.status,
        "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
    }
    for name in ("created", "in_progress", "expires", "finalizing", "completed", "failed", "expired",
                 "cancelling", "cancelled"):
        obj[f"{name}_at"] = _ts(getattr(batch, f"{name}_at"))
    obj["request_counts"] = request_counts
    obj["metadata"] = batch.meta
    obj["priority"] = effective_priority(batch.priority)
    return obj


def output_line(job: Job, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of a batch's output or error file, in OpenAI's output-line shape: a request that
    ran has a `response` (200 with its result, or the 4xx/5xx error answer the endpoint gives, see
    genq.shared.errors.job_failure); one that never ran (cancelled, or its batch expired) has only
    an `error`, `{"code", "message"}`."""
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    if job.status == "succeeded":
        body = public_result(job.result) if result is None else result
        response = {"status_code": 200, "request_id": job.id, "body": body}
    elif job.status == "cancelled":
        stored = job.error or {}
        error = {"code": stored.get("code") or ErrorCode.CANCELLED.value,
                 "message": stored.get("message") or "the request was cancelled"}
    else:
        status, failure = job_failure(job.error)
        response = {"status_code": status, "request_id": job.id, "body": {"error": failure}}
    return {"id": f"batch_req_{job.id.removeprefix('job_')}", "custom_id": job.custom_id,
            "response": response, "error": error}


def file_object(f: File) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": _ts(f.created_at),
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "status_details": None}


def model_object(spec: ModelSpec) -> dict[str, Any]:
    """OpenAI's Model object for a registry entry, with genq's kind, queue and batch size."""
    return {"id": spec.name, "object": "model", "created": 0, "owned_by": "genq", "kind": spec.kind,
            "queue": spec.queue, "max_batch_size": spec.options.max_batch_size}
