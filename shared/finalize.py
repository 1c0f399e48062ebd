"""Batch finalization: when every job of a batch is terminal, write its output and error files
to storage and move the batch to its final status. Whoever wins the guarded transition writes.

If storage is unavailable the claim is given up again, so the next upkeep pass (every few
seconds, in every API and worker process) tries once more until storage is back."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from genq.shared.db import Batch, File, Job, new_id, session_scope
from genq.shared.errors import ErrorCode, job_error
from genq.shared.jobs import has_active_jobs
from genq.shared.results import ResultRenderer
from genq.shared.storage import Storage, StorageUnavailable
from genq.shared.views import output_line
from genq.shared.webhooks import notify_batch

log = logging.getLogger("genq.finalize")
STALE_FINALIZE_S = 120.0
OUTPUT_PURPOSE = "batch_output"  # the purpose of the files genq writes
SWEEP_PAGE = 100  # batches per query of a sweep; a sweep pages through all of them


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


def _unclaim(factory: sessionmaker[Session], batch_id: str, final: str, claimed_at: float) -> None:
    """Give up the right to finalize (storage failed), so the next sweep finalizes at once
    instead of after STALE_FINALIZE_S."""
    with session_scope(factory) as session:
        mine = (Batch.id == batch_id, Batch.finalizing_at == claimed_at)
        if final == "cancelled":
            session.execute(update(Batch).where(*mine, Batch.status == "cancelling").values(finalizing_at=None))
        else:
            session.execute(update(Batch).where(*mine, Batch.status == "finalizing")
                            .values(status="in_progress", finalizing_at=None))


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


@lru_cache(maxsize=8)
def _autocommit(engine: Engine) -> Engine:
    """The engine's connections (the same pool) used outside a transaction."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _may_be_done(factory: sessionmaker[Session], batch_id: str) -> bool:
    """Whether no job of the batch is active, read outside a transaction: one round trip, where a
    session's BEGIN, SELECT and COMMIT take three. Workers check after every group of outcomes,
    so most checks are made while the batch still runs, and end here."""
    with _autocommit(factory.kw["bind"]).connect() as conn:
        return not has_active_jobs(conn, batch_id)


def maybe_finalize_batch(factory: sessionmaker[Session], storage: Storage, batch_id: str) -> str | None:
    """Finalize the batch if all its jobs are terminal. Returns the final status if this call did it."""
    if not _may_be_done(factory, batch_id):
        return None
    now = time.time()
    with session_scope(factory) as session:
        if has_active_jobs(session, batch_id):  # again, in the transaction that claims
            return None
        final = _claim(session, batch_id, now)
    if final is None:
        return None
    try:
        _write_results(factory, storage, batch_id, final)
    except StorageUnavailable as exc:
        _unclaim(factory, batch_id, final, now)
        log.warning("batch %s not finalized yet: %s; the next upkeep pass retries", batch_id, exc)
        return None
    return final


def _write_results(factory: sessionmaker[Session], storage: Storage, batch_id: str, final: str) -> None:
    """Write the batch's output and error files and move it to `final`."""
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


def _batch_ids(factory: sessionmaker[Session], *where: Any) -> Iterator[str]:
    """Ids of the batches matching `where`, oldest first (ids sort by creation time), a page at a
    time, so a sweep reaches every one of them however many there are."""
    after = ""
    while True:
        with session_scope(factory) as session:
            ids = session.execute(select(Batch.id).where(*where, Batch.id > after).order_by(Batch.id)
                                  .limit(SWEEP_PAGE)).scalars().all()
        yield from ids
        if len(ids) < SWEEP_PAGE:
            return
        after = ids[-1]


def expire_batches(factory: sessionmaker[Session], storage: Storage) -> list[str]:
    """Close batches whose completion window has passed: jobs not yet started are cancelled,
    running ones may finish, and the batch ends `expired` with every finished result delivered."""
    now = time.time()
    expired = []
    for batch_id in list(_batch_ids(factory, Batch.status == "in_progress", Batch.expires_at < now,
                                    Batch.expired_at.is_(None))):
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
    ids = list(_batch_ids(factory, (Batch.status == "in_progress") | (Batch.status == "cancelling")
                          | ((Batch.status == "finalizing") & (Batch.finalizing_at < stale))))
    return [b for b in ids if maybe_finalize_batch(factory, storage, b)]
