"""Public JSON shapes of jobs, batches and output lines (the contract's section 2)."""

from __future__ import annotations

from typing import Any

from genq.shared.db import Adapter, Batch, File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob, Job, tenant_key
from genq.shared.errors import ErrorCode, job_failure
from genq.shared.fine_tuning_jobs import checkpoint_model_name
from genq.shared.registry import ModelSpec
from genq.shared.requests import effective_priority
from genq.shared.results import requested_model, stored_result


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def job_object(job: Job, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job as the API shows it; `result` is the rendered result (see shared.results)."""
    return {
        "id": job.id, "object": "job", "batch_id": job.batch_id, "custom_id": job.custom_id,
        "url": job.url, "model": requested_model(job), "status": job.status,
        "priority": effective_priority(job.priority),
        "progress": round(job.progress or 0.0, 4), "attempts": job.attempts,
        "created_at": _ts(job.created_at), "started_at": _ts(job.started_at),
        "finished_at": _ts(job.finished_at), "error": job.error,
        "result": stored_result(job) if result is None else result,
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
        body = stored_result(job) if result is None else result
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


def model_object(spec: ModelSpec, *, name: str | None = None, created: int = 0,
                 owned_by: str = "genq") -> dict[str, Any]:
    """OpenAI's Model object for a registry entry (or, with `name`, a model served by it), with
    genq's kind, queue and batch size."""
    return {"id": name or spec.name, "object": "model", "created": created, "owned_by": owned_by,
            "kind": spec.kind, "queue": spec.queue, "max_batch_size": spec.options.max_batch_size}


def fine_tuned_model_object(row: Adapter, base: ModelSpec) -> dict[str, Any]:
    """A fine-tuned model (its adapter row) as OpenAI lists one: owned by its tenant (as a job's
    `organization_id` says), served on its base model's queue."""
    return model_object(base, name=row.name, created=int(row.created_at), owned_by=tenant_key(row.tenant))


# The metrics OpenAI's checkpoint object has; a worker may record more, which the object leaves out.
CHECKPOINT_METRICS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                      "full_valid_loss", "full_valid_mean_token_accuracy")


def fine_tuning_job_object(job: FineTuningJob) -> dict[str, Any]:
    """OpenAI's `fine_tuning.job`, field for field: the hyperparameters shown are those the job
    trains with ("auto" resolved), also under `method`; the model name only once it succeeded."""
    hyperparameters = dict(job.hyperparameters)
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": int(job.created_at), "error": job.error,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
        "finished_at": _ts(job.finished_at), "hyperparameters": hyperparameters, "model": job.model,
        "organization_id": tenant_key(job.tenant), "result_files": list(job.result_files or []), "seed": job.seed,
        "status": job.status, "trained_tokens": job.trained_tokens, "training_file": job.training_file,
        "validation_file": job.validation_file, "estimated_finish": None, "integrations": None,
        "metadata": job.meta, "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }


def fine_tuning_event_object(event: FineTuningEvent) -> dict[str, Any]:
    return {"id": event.id, "object": "fine_tuning.job.event", "created_at": int(event.created_at),
            "level": event.level, "message": event.message, "data": event.data, "type": event.type}


def fine_tuning_checkpoint_object(checkpoint: FineTuningCheckpoint, job: FineTuningJob) -> dict[str, Any]:
    metrics = {k: checkpoint.metrics[k] for k in CHECKPOINT_METRICS if k in (checkpoint.metrics or {})}
    return {"id": checkpoint.id, "object": "fine_tuning.job.checkpoint", "created_at": int(checkpoint.created_at),
            "fine_tuned_model_checkpoint": checkpoint_model_name(job.fine_tuned_model, checkpoint.step),
            "fine_tuning_job_id": job.id, "metrics": {"step": checkpoint.step, **metrics},
            "step_number": checkpoint.step}
