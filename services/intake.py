"""Batches made from an uploaded input file: recorded as `validating`, then checked line by line
outside the request. Valid input becomes jobs (`in_progress`); invalid input fails the batch
whole with an `errors` list naming every bad line and field, as OpenAI does."""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from genq.services import jobs as jobs_data
from genq.services import submit
from genq.services.errors import APIError
from genq.services.ndjson import validate_ndjson
from genq.services.state import AppState
from genq.services.validation import MAX_ERRORS_REPORTED
from genq.shared.db import Batch, File, session_scope
from genq.shared.errors import ErrorCode
from genq.shared.webhooks import notify_batch

log = logging.getLogger("genq.api")
STALE_VALIDATING_S = 300.0


def validate_file_batch(state: AppState, batch_id: str) -> str:
    """Validate a `validating` batch's input file and start or fail it. Returns the new status."""
    with session_scope(state.sessions) as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status != "validating":
            return batch.status if batch else "missing"
        file = session.get(File, batch.input_file_id)
        if file is None or file.tenant != batch.tenant:
            missing = {"code": ErrorCode.INVALID_FILE.value, "line": None, "param": "input_file_id",
                       "message": f"input file {batch.input_file_id} not found"}
            if jobs_data.fail_validation(session, batch_id, [missing]):
                notify_batch(session, batch_id)
            return "failed"
        raw = state.storage.get(file.key)
        lines, errors = validate_ndjson(raw, state.registry, max_lines=state.limits.max_batch_lines,
                                       endpoint=batch.endpoint, max_prompt_chars=state.limits.max_prompt_chars,
                                       adapters=submit.adapters(state, session, batch.tenant))
        if errors:
            if jobs_data.fail_validation(session, batch_id, [e.as_dict() for e in errors[:MAX_ERRORS_REPORTED]]):
                notify_batch(session, batch_id)
            log.info("batch %s failed validation: %d problem(s)", batch_id, len(errors))
            return "failed"
        try:  # like OpenAI's enqueued-token limit: a batch over the tenant's quota fails at validation
            submit.admit(state, session, batch.tenant, len(lines))
        except APIError as exc:
            over = {"code": exc.code, "line": None, "param": None, "message": exc.message}
            if jobs_data.fail_validation(session, batch_id, [over]):
                notify_batch(session, batch_id)
            return "failed"
        to_publish = jobs_data.start_validated_batch(session, batch, lines)
    if to_publish is None:
        return "raced"
    submit.publish(state, to_publish)
    log.info("batch %s validated: %d jobs queued", batch_id, len(to_publish))
    return "in_progress"


def resume_stale_validations(state: AppState) -> list[str]:
    """Re-run validation for batches left `validating` by an API process that stopped."""
    cutoff = time.time() - STALE_VALIDATING_S
    with state.sessions() as session:
        ids = session.execute(select(Batch.id).where(Batch.status == "validating", Batch.created_at < cutoff)
                              .limit(20)).scalars().all()
    return [b for b in ids if validate_file_batch(state, b) == "in_progress"]
