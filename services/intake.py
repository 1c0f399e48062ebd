"""Batches made from an uploaded input file: recorded as `validating`, then checked line by line
outside the request. Valid input becomes jobs (`in_progress`); invalid input fails the batch
whole with an `errors` list naming every bad line and field, as OpenAI does.

The API process validating a batch holds a lease on it (`batches.validating_until`), renewed
while it works; if the process dies, another one's maintenance takes the batch over once the
lease has run out, within seconds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
VALIDATION_LEASE_S = 10.0  # renewed every third of it while the owner validates


def validate_file_batch(state: AppState, batch_id: str) -> str:
    """Validate a `validating` batch's input file and start or fail it, unless another process
    holds its validation. Returns the new status ("validating" if held elsewhere)."""
    with session_scope(state.sessions) as session:
        held = jobs_data.hold_validation(session, batch_id, lease_s=VALIDATION_LEASE_S)
        if not held:
            batch = session.get(Batch, batch_id)
            return batch.status if batch else "missing"
    with _renewing(state, batch_id):
        return _validate(state, batch_id)


@contextmanager
def _renewing(state: AppState, batch_id: str) -> Iterator[None]:
    """Renew the batch's validation lease in the background until the block ends."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(VALIDATION_LEASE_S / 3):
            try:
                with session_scope(state.sessions) as session:
                    jobs_data.hold_validation(session, batch_id, lease_s=VALIDATION_LEASE_S, renew=True)
            except Exception:  # the database is down: the lease may pass to another process
                log.warning("could not renew the validation lease of batch %s", batch_id, exc_info=True)

    thread = threading.Thread(target=renew, name=f"genq-validating-{batch_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _validate(state: AppState, batch_id: str) -> str:
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
                                       adapters=submit.adapters(state, session, batch.tenant),
                                       webhook_policy=state.webhook_policy)
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
    """Re-run validation for batches left `validating` by an API process that stopped: its lease
    ran out, or it died before it took one (the batch is older than a lease)."""
    now = time.time()
    orphaned = Batch.validating_until.is_(None) & (Batch.created_at < now - VALIDATION_LEASE_S)
    with state.sessions() as session:
        ids = session.execute(select(Batch.id).where(Batch.status == "validating",
                                                     orphaned | (Batch.validating_until < now))
                              .limit(20)).scalars().all()
    return [b for b in ids if validate_file_batch(state, b) == "in_progress"]
