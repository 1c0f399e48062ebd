"""Fine-tuning job state, shared by the API (which creates and cancels jobs) and the training
worker (which runs them and reports events and checkpoints): ids, names, events and the guarded
status changes.

Statuses, as OpenAI's: `validating_files` -> `queued` -> `running` -> `succeeded` | `failed`, and
`cancelled` from any but the last two. A running job is cancelled by its worker, which sees
`cancel_requested_at` and stops at its next step.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from sqlalchemy import update
from sqlalchemy.orm import Session

from genq.shared.db import FineTuningEvent, FineTuningJob, new_id

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
NOT_STARTED = ("validating_files", "queued")
TRAINABLE_KINDS = ("text",)  # the kinds of registry model genq fine-tunes
DEFAULT_SUFFIX = "genq"  # the name's part where OpenAI puts the organisation, when no suffix is given
# Fine-tuned model names start so; registry models and uploaded adapters cannot (their names hold no ':').
FINE_TUNED_PREFIX = "ft:"

Level = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]


def new_ft_id(prefix: Literal["ftjob", "ftevent", "ftckpt"]) -> str:
    """OpenAI's `ftjob-...` style over genq's time-ordered ids (so newer ids still sort later)."""
    return new_id(prefix).replace("_", "-", 1)


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<suffix or genq>:<job id>`, the name a succeeded job's model is served under."""
    return f"{FINE_TUNED_PREFIX}{base}:{suffix or DEFAULT_SUFFIX}:{job_id}"


def is_fine_tuned(model: object) -> bool:
    """Whether a request's `model` names a fine-tuned model (served as its base with its adapter)."""
    return isinstance(model, str) and model.startswith(FINE_TUNED_PREFIX)


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    """OpenAI's checkpoint names: the job's model name and `:ckpt-step-<step>`."""
    return f"{fine_tuned_model}:ckpt-step-{step}"


def add_event(session: Session, job_id: str, message: str, *, level: Level = "info", kind: EventType = "message",
              data: dict[str, Any] | None = None, at: float | None = None) -> FineTuningEvent:
    """Record one of a job's events (in the caller's transaction). Metrics events carry `data`
    such as `{"step", "train_loss", ...}`."""
    event = FineTuningEvent(id=new_ft_id("ftevent"), job_id=job_id, created_at=time.time() if at is None else at,
                            level=level, type=kind, message=message[:2000], data=data)
    session.add(event)
    return event


def cancel(session: Session, job_id: str, *, now: float | None = None) -> str:
    """Cancel a job: one not started yet is `cancelled` at once; a running one is asked to stop
    (`cancel_requested_at`) and stays `running` until its worker stops. Returns what happened:
    "cancelled", "requested", or "finished" (nothing to cancel). Guarded updates, so a worker
    starting the job at the same moment cannot be overwritten."""
    now = time.time() if now is None else now
    done = session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id,
                                                       FineTuningJob.status.in_(NOT_STARTED))
                           .values(status="cancelled", finished_at=now, cancel_requested_at=now))
    if done.rowcount:  # type: ignore[attr-defined]
        add_event(session, job_id, "Fine-tuning job cancelled", at=now)
        return "cancelled"
    asked = session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status == "running",
                                                        FineTuningJob.cancel_requested_at.is_(None))
                            .values(cancel_requested_at=now))
    if asked.rowcount:  # type: ignore[attr-defined]
        add_event(session, job_id, "Cancellation requested: the job stops at its next training step", at=now)
        return "requested"
    job = session.get(FineTuningJob, job_id)
    return "requested" if job is not None and job.status == "running" else "finished"
