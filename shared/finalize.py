"""Batch finalization: when every job of a batch is terminal, write its output and error files
to storage and move the batch to its final status. Whoever wins the guarded transition writes."""

from __future__ import annotations

import json
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from genq.shared.db import Batch, File, Job, new_id, session_scope
from genq.shared.errors import ErrorCode, job_error
from genq.shared.jobs import has_active_jobs
from genq.shared.results import ResultRenderer
from genq.shared.storage import Storage
from genq.shared.views import output_line
from genq.shared.webhooks import notify_batch

STALE_FINALIZE_S = 120.0
OUTPUT_PURPOSE = "batch_output"  # the purpose of the files genq writes


def _claim(session: Session, batch_id: str, now: float) -> str | None:
    """Take the right to finalize; returns the status to end in, or None if not ours."""
    stale = now - STALE_FINALIZE_S
    res = session.execute(update(Batch).where(
        Batch.id == batch_id,
        (Batch.status == "in_progress") | ((Batch.status == "finalizing") & (Batch.finalizing_at < stale)),
    ).values(status="finalizing", finalizing_at=now))
    if res.rowcount:  # type: ignore[attr-defined]
        expired = session.execute(select(Batch.expired_at).where(Batch.id == batch_id)).scalar()
        return "expired" if expired is not None else "completed"
    # A cancelled batch keeps the status `cancelling` while its partial output is written.
    res = session.execute(update(Batch).where(
        Batch.id == batch_id, Batch.status == "cancelling",
        (Batch.finalizing_at.is_(None)) | (Batch.finalizing_at < stale),
    ).values(finalizing_at=now))
    return "cancelled" if res.rowcount else None  # type: ignore[attr-defined]


def _write_file(session: Session, storage: Storage, batch: Batch, purpose: str, name: str,
                lines: list[bytes]) -> str | None:
    if not lines:
        return None
    data = b"".join(lines)
    file_id = new_id("file")
    key = f"files/{file_id}.jsonl"
    storage.put(key, data, "application/jsonl")
    session.add(File(id=file_id, tenant=batch.tenant, purpose=purpose, filename=f"{batch.id}_{name}.jsonl",
                     bytes=len(data), key=key, created_at=time.time()))
    return file_id


def maybe_finalize_batch(factory: sessionmaker[Session], storage: Storage, batch_id: str) -> str | None:
    """Finalize the batch if all its jobs are terminal. Returns the final status if this call did it."""
    with session_scope(factory) as session:
        if has_active_jobs(session, batch_id):
            return None
        final = _claim(session, batch_id, time.time())
    if final is None:
        return None
    with session_scope(factory) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        # Images are written as their API paths, which never expire; the API turns them into fresh
        # URLs whenever the file is read (genq.services.output_files).
        renderer = ResultRenderer(storage, stable=True)
        ok: list[bytes] = []
        bad: list[bytes] = []
        jobs = session.execute(select(Job).where(Job.batch_id == batch_id).order_by(Job.seq)
                               .execution_options(yield_per=2000)).scalars()
        for job in jobs:
            line = (json.dumps(output_line(job, renderer.render(job)), separators=(",", ":")) + "\n").encode()
            (ok if job.status == "succeeded" else bad).append(line)
        output_id = _write_file(session, storage, batch, OUTPUT_PURPOSE, "output", ok)
        error_id = _write_file(session, storage, batch, OUTPUT_PURPOSE, "errors", bad)
        now = time.time()
        # An expired batch keeps the expired_at of the moment its window closed.
        stamp = {"completed": {"completed_at": now}, "cancelled": {"cancelled_at": now}, "expired": {}}[final]
        session.execute(update(Batch).where(Batch.id == batch_id, Batch.status.in_(("finalizing", "cancelling")))
                        .values(status=final, output_file_id=output_id, error_file_id=error_id, **stamp))
        notify_batch(session, batch_id)
    return final


def expire_batches(factory: sessionmaker[Session], storage: Storage) -> list[str]:
    """Close batches whose completion window has passed: jobs not yet started are cancelled,
    running ones may finish, and the batch ends `expired` with every finished result delivered."""
    now = time.time()
    with session_scope(factory) as session:
        ids = session.execute(select(Batch.id).where(
            Batch.status == "in_progress", Batch.expires_at < now, Batch.expired_at.is_(None)).limit(100)
        ).scalars().all()
    expired = []
    for batch_id in ids:
        with session_scope(factory) as session:
            res = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "in_progress",
                                                      Batch.expired_at.is_(None)).values(expired_at=now))
            if not res.rowcount:  # type: ignore[attr-defined]
                continue
            session.execute(update(Job).where(Job.batch_id == batch_id, Job.status == "queued").values(
                status="cancelled", finished_at=now,
                error=job_error(ErrorCode.BATCH_EXPIRED,
                                "the batch's completion window ended before this request started")))
        expired.append(batch_id)
        maybe_finalize_batch(factory, storage, batch_id)
    return expired


def finalize_stale_batches(factory: sessionmaker[Session], storage: Storage) -> list[str]:
    """Finish batches whose finalizer died, or whose last job ended without finalizing."""
    stale = time.time() - STALE_FINALIZE_S
    with session_scope(factory) as session:
        ids = session.execute(select(Batch.id).where(
            (Batch.status == "in_progress") | (Batch.status == "cancelling")
            | ((Batch.status == "finalizing") & (Batch.finalizing_at < stale))).limit(100)).scalars().all()
    return [b for b in ids if maybe_finalize_batch(factory, storage, b)]
