"""Creating fine-tuning jobs: the checks a create request passes before anything is stored (the
base model, the files and their every line), the job's row and first events, and the one seam
that hands a job to the training workers (`enqueue_fine_tune`)."""

from __future__ import annotations

import logging
import secrets
import time

from sqlalchemy.orm import Session

from genq.services.errors import APIError
from genq.services.state import AppState
from genq.services.webhooks import validate_subscription
from genq.shared import fine_tuning_jobs as ft_state
from genq.shared.db import File, FineTuningJob
from genq.shared.fine_tuning import (
    MAX_ERRORS_REPORTED,
    SEED_MAX,
    Example,
    FineTuningJobCreate,
    parse_training_file,
    resolve_hyperparameters,
    resolve_lora,
)
from genq.shared.fine_tuning_jobs import TRAINABLE_KINDS, add_event, fine_tuned_model_name, new_ft_id
from genq.shared.registry import Registry
from genq.shared.storage import Storage

log = logging.getLogger("genq.api")
FINE_TUNE_PURPOSE = "fine-tune"


def check_base_model(registry: Registry, name: str) -> None:
    """400 unless `name` is a registry model that genq can fine-tune (a text model)."""
    spec = registry.get(name)
    if spec is None:
        raise APIError(400, f"model: {name!r} is not in the registry", code="model_not_found", param="model")
    if spec.kind not in TRAINABLE_KINDS:
        raise APIError(400, f"model: {name!r} is a {spec.kind} model; genq fine-tunes text models",
                       code="invalid_request", param="model")


def file_errors(param: str, errors: list[dict[str, object]]) -> APIError:
    """The 400 of a training or validation file with bad lines: the first named in the message,
    up to MAX_ERRORS_REPORTED in `errors`, each with its line and field."""
    first, more = errors[0], len(errors) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return APIError(400, f"{param}: {first['message']}{tail}", code=str(first["code"]), param=param,
                    extra={"line": first["line"], "errors": errors[:MAX_ERRORS_REPORTED]})


def training_examples(session: Session, storage: Storage, tenant: str | None, file_id: str,
                      param: str) -> list[Example]:
    """The examples of the tenant's fine-tune file `file_id`, or a 400 naming `param` (another
    tenant's file is as absent as a missing one) and, for bad content, the line and field."""
    file = session.get(File, file_id)
    if file is None or file.tenant != tenant:
        raise APIError(400, f"{param}: no file with id {file_id!r}", code="invalid_file", param=param)
    if file.purpose != FINE_TUNE_PURPOSE:
        raise APIError(400, f"{param}: file {file_id} has purpose {file.purpose!r}; upload training data with "
                       f"purpose {FINE_TUNE_PURPOSE!r}", code="invalid_file", param=param)
    examples, errors = parse_training_file(storage.get(file.key))
    if errors:
        raise file_errors(param, [e.as_dict() for e in errors])
    return examples


def create_job(state: AppState, session: Session, spec: FineTuningJobCreate, tenant: str | None) -> FineTuningJob:
    """Check the request's model and files, then record the job `queued` with its first events
    (in the caller's transaction). The files are read and checked here, in the request, so that a
    bad line is a 400 naming it rather than a job that fails later."""
    check_base_model(state.registry, spec.model)
    job_id = new_ft_id("ftjob")
    now = time.time()
    add_event(session, job_id, f"Created fine-tuning job: {job_id}", at=now)
    add_event(session, job_id, f"Validating training file: {spec.training_file}", at=now)
    examples = training_examples(session, state.storage, tenant, spec.training_file, "training_file")
    if spec.validation_file is not None:
        add_event(session, job_id, f"Validating validation file: {spec.validation_file}", at=now)
        training_examples(session, state.storage, tenant, spec.validation_file, "validation_file")
    webhook_url = check_webhook(state, spec)
    hyperparameters = resolve_hyperparameters(spec.requested_hyperparameters(), len(examples))
    lora = resolve_lora(spec.lora)
    job = FineTuningJob(
        id=job_id, tenant=tenant, status="queued", model=spec.model, training_file=spec.training_file,
        validation_file=spec.validation_file, suffix=spec.suffix,
        seed=spec.seed if spec.seed is not None else secrets.randbelow(SEED_MAX + 1),
        hyperparameters=hyperparameters, lora=lora, meta=spec.metadata,
        fine_tuned_model=fine_tuned_model_name(spec.model, spec.suffix, job_id), result_files=[],
        created_at=now, attempts=0, webhook_url=webhook_url, webhook_events=spec.webhook_events)
    session.add(job)
    add_event(session, job_id, "Files validated, moving job to queued state", at=now,
              data={"training_examples": len(examples), "hyperparameters": hyperparameters, "lora": lora})
    return job


def check_webhook(state: AppState, spec: FineTuningJobCreate) -> str | None:
    """The job's webhook URL, checked as a job's or batch's is (400 naming the field)."""
    if spec.webhook_url is None:
        if spec.webhook_events is not None:
            raise APIError(400, "webhook_events: needs a webhook_url", code="invalid_request", param="webhook_events")
        return None
    try:
        url, _ = validate_subscription(spec.webhook_url, None, state.webhook_policy)
    except ValueError as exc:
        raise APIError(400, f"webhook_url: {exc}", code="invalid_request", param="webhook_url") from None
    return url


def enqueue_fine_tune(state: AppState, job: FineTuningJob) -> bool:
    """Hand a committed `queued` job to the training workers: the task `genq.fine_tune` with the job
    id on the queue `genq.train.<model>`. A broker outage does not fail the request (the job is
    recorded); False is returned and the upkeep sweep publishes the job once the broker is back."""
    return ft_state.publish(state.sessions, state.publisher, job.id, job.model)
