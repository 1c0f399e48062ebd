"""Fine-tuning job state, shared by the API (which creates and cancels jobs) and the training
worker (which runs them and reports events and checkpoints): ids, names, events and the guarded
status changes.

Statuses, as OpenAI's: `validating_files` -> `queued` -> `running` -> `succeeded` | `failed`, and
`cancelled` from any but the last two. A running job is cancelled by its worker, which sees
`cancel_requested_at` and stops at its next step.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from genq.shared.broker import Publisher
from genq.shared.db import FineTuningEvent, FineTuningJob, new_id, session_scope

log = logging.getLogger("genq.fine_tuning")
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


# --- handing jobs to the training queues ---------------------------------------------------------

UNPUBLISHED_GRACE_S = 30.0  # a queued job unpublished for longer missed its publish: send it again
SWEEP_LIMIT = 100


def publish(factory: sessionmaker[Session], publisher: Publisher, job_id: str, model: str) -> bool:
    """Send a queued job's task to its training queue and record that it went (False, and logged,
    when the broker is down: the sweep below sends it later). A message that is sent twice is
    harmless: a worker starts a job only from `queued`."""
    try:
        publisher.publish_fine_tune(job_id, model)
    except Exception:  # kombu raises many kinds; the job is recorded either way
        log.warning("could not publish fine-tuning job %s; it stays queued", job_id, exc_info=True)
        return False
    with session_scope(factory) as session:
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status == "queued")
                        .values(published_at=time.time()))
    return True


def sweep_unpublished(factory: sessionmaker[Session], publisher: Publisher, models: list[str] | None = None, *,
                      grace_s: float = UNPUBLISHED_GRACE_S) -> int:
    """Publish the queued jobs whose message never reached the broker, or was lost with the
    broker's data (published before its epoch); returns how many went out."""
    now = time.time()
    try:
        epoch = publisher.epoch()
    except Exception:  # noqa: BLE001 - broker down: the unpublished ones are still tried below
        epoch = None
    lost = FineTuningJob.published_at.is_(None) & (FineTuningJob.created_at < now - grace_s)
    if epoch is not None:
        lost = lost | (FineTuningJob.published_at < epoch)
    q = select(FineTuningJob.id, FineTuningJob.model).where(FineTuningJob.status == "queued", lost)
    if models is not None:
        q = q.where(FineTuningJob.model.in_(models))
    with session_scope(factory) as session:
        rows = session.execute(q.order_by(FineTuningJob.id).limit(SWEEP_LIMIT)).all()
    sent = sum(publish(factory, publisher, job_id, model) for job_id, model in rows)
    if sent:
        log.warning("published %d fine-tuning job(s) the broker had not received", sent)
    return sent
