"""The publish outbox: a job is recorded first and handed to the broker second.

`jobs.published_at` stays NULL until the job's message reached the broker. A submission publishes
right after its commit and marks what went out; if the broker is down the client still gets its
answer, and `sweep_unpublished` (API maintenance and worker upkeep) publishes the job once the
broker is back. `republish_lost` covers the opposite case: the broker lost messages it had taken
(a restart without persistence, a FLUSHALL), so jobs wait `queued` for a message that no longer
exists. A Redis broker tells when its data began (redis_transport.EPOCH_KEY), so these are found
at the next upkeep pass even while new work keeps the queue busy.

Duplicates are harmless (claims are guarded UPDATEs), so the sweepers prefer publishing twice to
losing a job; they still lock what they publish so replicas do not flood the queue together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, sessionmaker

from genq.shared.broker import Publish, Publisher
from genq.shared.db import Job, session_scope

log = logging.getLogger("genq.outbox")

# Unpublished jobs younger than this are left to the process that created them: it may still be
# publishing a large batch.
UNPUBLISHED_GRACE_S = 10.0
# A queued job published this long ago while its model's queue is empty lost its message.
LOST_AFTER_S = 15.0
SWEEP_LIMIT = 1000  # jobs per page: one locked SELECT, one UPDATE and one broker round trip
# A sweep goes on through pages for this long, then leaves the rest to the next pass (every few
# seconds); bounded so that a worker's upkeep pass still renews its leases in time.
SWEEP_BUDGET_S = 2.0
# Jobs published before they are marked: a process that dies mid-publish leaves at most this many
# published but unmarked (they are published again), not a whole batch.
PUBLISH_CHUNK = 500


def mark_published(factory: sessionmaker[Session], job_ids: Sequence[str]) -> None:
    now = time.time()
    with session_scope(factory) as s:
        for start in range(0, len(job_ids), PUBLISH_CHUNK):
            s.execute(update(Job).where(Job.id.in_(job_ids[start:start + PUBLISH_CHUNK]))
                      .values(published_at=now).execution_options(synchronize_session=False))


def publish_and_mark(factory: sessionmaker[Session], publisher: Publisher, items: Iterable[Publish]) -> bool:
    """Publish committed jobs in chunks of PUBLISH_CHUNK, marking each chunk as soon as it went
    out. False (logged) if the broker refused: the jobs not yet sent keep `published_at` NULL and
    the sweeper publishes them later."""
    items = list(items)
    for start in range(0, len(items), PUBLISH_CHUNK):
        chunk = items[start:start + PUBLISH_CHUNK]
        try:
            publisher.publish(chunk)
        except Exception as exc:  # noqa: BLE001 - any broker failure leaves the work to the sweeper
            log.warning("broker unavailable, %d job(s) left for the outbox sweeper: %s: %s",
                        len(items) - start, type(exc).__name__, exc)
            return False
        try:
            mark_published(factory, [i.job_id for i in chunk])
        except Exception as exc:  # noqa: BLE001 - published but unmarked: at worst published twice
            log.warning("could not mark %d job(s) published (%s); they may be published again",
                        len(chunk), type(exc).__name__)
    return True


def _publish_locked(s: Session, publisher: Publisher, where: Sequence[ColumnElement[bool]], limit: int,
                    front: bool = False) -> int:
    """Lock a page of matching queued jobs, stamp them, publish, and let the caller commit.
    A failed publish raises, rolling the stamp back. Jobs that ran before (handed back, or
    recovered from a dead worker) and, with `front`, all of them go ahead of new work."""
    ids = s.execute(select(Job.id).where(Job.status == "queued", *where).order_by(Job.created_at)
                    .limit(limit).with_for_update(skip_locked=True)).scalars().all()
    if not ids:
        return 0
    rows = s.execute(update(Job).where(Job.id.in_(ids), Job.status == "queued", *where)
                     .values(published_at=time.time())
                     .returning(Job.id, Job.model, Job.priority, Job.attempts)
                     .execution_options(synchronize_session=False)).all()
    publisher.publish([Publish(job_id, model, priority, front=front or attempts > 0)
                       for job_id, model, priority, attempts in rows])
    return len(rows)


def _publish_pages(factory: sessionmaker[Session], publisher: Publisher, where: Sequence[ColumnElement[bool]],
                   limit: int, budget_s: float, front: bool = False) -> int:
    """Publish matching queued jobs page by page, each page its own transaction, until none are
    left or `budget_s` has passed. Returns how many went out; a failure raises (the current page
    rolls back, the pages before it stay published)."""
    deadline = time.monotonic() + budget_s
    count = 0
    while True:
        with session_scope(factory) as s:
            sent = _publish_locked(s, publisher, where, limit, front)
        count += sent
        if sent < limit or time.monotonic() >= deadline:
            return count


def sweep_unpublished(factory: sessionmaker[Session], publisher: Publisher, *, models: list[str] | None = None,
                      grace_s: float = UNPUBLISHED_GRACE_S, limit: int = SWEEP_LIMIT,
                      budget_s: float = SWEEP_BUDGET_S) -> int:
    """Publish queued jobs whose message never reached the broker, for up to `budget_s`.
    Returns how many went out."""
    where: list[ColumnElement[bool]] = [Job.published_at.is_(None), Job.created_at < time.time() - grace_s]
    if models:
        where.append(Job.model.in_(models))
    count = 0
    try:
        count = _publish_pages(factory, publisher, where, limit, budget_s)
    except Exception as exc:  # noqa: BLE001 - broker or database still down: next sweep
        log.warning("outbox sweep deferred: %s: %s", type(exc).__name__, str(exc)[:200])
    if count:
        log.warning("published %d job(s) the broker had not received", count)
    return count


def republish_lost(factory: sessionmaker[Session], publisher: Publisher, models: Iterable[str], *,
                   after_s: float = LOST_AFTER_S, limit: int = SWEEP_LIMIT, budget_s: float = SWEEP_BUDGET_S) -> int:
    """Publish again the queued jobs whose messages the broker lost; returns how many went out.

    A broker that can tell when its present data began (Redis: redis_transport.EPOCH_KEY) lost the
    messages of every job still queued that was published before then, however busy the queue.
    Any broker: a model's queue that is empty although its jobs were published more than
    `after_s` ago lost theirs. Re-published jobs go ahead of newer work: they waited longest."""
    models = list(models)
    count = 0
    try:
        epoch = publisher.epoch()
        if epoch is not None:
            where = [Job.model.in_(models), Job.published_at < epoch]
            count = _publish_pages(factory, publisher, where, limit, budget_s, front=True)
            if count:
                log.warning("the broker lost its messages: published %d queued job(s) again", count)
    except Exception as exc:  # noqa: BLE001 - broker or database still down: next sweep
        log.warning("lost-message sweep deferred: %s: %s", type(exc).__name__, str(exc)[:200])
        return count
    for model in models:
        try:
            if publisher.pending(model) != 0:
                continue  # messages are waiting: workers will get to these jobs
            where = [Job.model == model, Job.published_at < time.time() - after_s]
            with session_scope(factory) as s:
                sent = _publish_locked(s, publisher, where, limit, front=True)
        except Exception as exc:  # noqa: BLE001 - broker or database still down: next sweep
            log.warning("lost-message sweep deferred: %s: %s", type(exc).__name__, str(exc)[:200])
            return count
        if sent:
            log.warning("queue of %s is empty but %d job(s) still wait: published them again", model, sent)
        count += sent
    return count
