"""The publish outbox: a job is recorded first and handed to the broker second.

`jobs.published_at` stays NULL until the job's message reached the broker. A submission publishes
right after its commit and marks what went out; if the broker is down the client still gets its
answer, and `sweep_unpublished` (API maintenance and worker upkeep) publishes the job once the
broker is back. `republish_lost` covers the opposite case: the broker lost messages it had taken
(a restart without persistence), so jobs wait `queued` for a message that no longer exists.

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
SWEEP_LIMIT = 1000
_MARK_CHUNK = 900  # ids per UPDATE (SQLite's bound-parameter limit is far above this)


def mark_published(factory: sessionmaker[Session], job_ids: Sequence[str]) -> None:
    now = time.time()
    with session_scope(factory) as s:
        for start in range(0, len(job_ids), _MARK_CHUNK):
            s.execute(update(Job).where(Job.id.in_(job_ids[start:start + _MARK_CHUNK]))
                      .values(published_at=now).execution_options(synchronize_session=False))


def publish_and_mark(factory: sessionmaker[Session], publisher: Publisher, items: Iterable[Publish]) -> bool:
    """Publish committed jobs and record that they went out. False (logged) if the broker refused:
    the jobs keep `published_at` NULL and the sweeper publishes them later."""
    items = list(items)
    if not items:
        return True
    try:
        publisher.publish(items)
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the work to the sweeper
        log.warning("broker unavailable, %d job(s) left for the outbox sweeper: %s: %s",
                    len(items), type(exc).__name__, exc)
        return False
    try:
        mark_published(factory, [i.job_id for i in items])
    except Exception as exc:  # noqa: BLE001 - published but unmarked: at worst published twice
        log.warning("could not mark %d job(s) published (%s); they may be published again",
                    len(items), type(exc).__name__)
    return True


def _publish_locked(s: Session, publisher: Publisher, where: Sequence[ColumnElement[bool]], limit: int) -> int:
    """Lock a page of matching queued jobs, stamp them, publish, and let the caller commit.
    A failed publish raises, rolling the stamp back."""
    ids = s.execute(select(Job.id).where(Job.status == "queued", *where).order_by(Job.created_at)
                    .limit(limit).with_for_update(skip_locked=True)).scalars().all()
    if not ids:
        return 0
    rows = s.execute(update(Job).where(Job.id.in_(ids), Job.status == "queued", *where)
                     .values(published_at=time.time()).returning(Job.id, Job.model, Job.priority)
                     .execution_options(synchronize_session=False)).all()
    publisher.publish([Publish(job_id, model, priority) for job_id, model, priority in rows])
    return len(rows)


def sweep_unpublished(factory: sessionmaker[Session], publisher: Publisher, *, models: list[str] | None = None,
                      grace_s: float = UNPUBLISHED_GRACE_S, limit: int = SWEEP_LIMIT) -> int:
    """Publish queued jobs whose message never reached the broker. Returns how many went out."""
    where: list[ColumnElement[bool]] = [Job.published_at.is_(None), Job.created_at < time.time() - grace_s]
    if models:
        where.append(Job.model.in_(models))
    try:
        with session_scope(factory) as s:
            count = _publish_locked(s, publisher, where, limit)
    except Exception as exc:  # noqa: BLE001 - broker or database still down: next sweep
        log.warning("outbox sweep deferred: %s: %s", type(exc).__name__, str(exc)[:200])
        return 0
    if count:
        log.warning("published %d job(s) the broker had not received", count)
    return count


def republish_lost(factory: sessionmaker[Session], publisher: Publisher, models: Iterable[str], *,
                   after_s: float = LOST_AFTER_S, limit: int = SWEEP_LIMIT) -> int:
    """Publish again the queued jobs of models whose queue is empty although the jobs were
    published more than `after_s` ago: their messages are gone. Returns how many went out."""
    count = 0
    for model in models:
        try:
            if publisher.pending(model) != 0:
                continue  # messages are waiting: workers will get to these jobs
            where = [Job.model == model, Job.published_at < time.time() - after_s]
            with session_scope(factory) as s:
                sent = _publish_locked(s, publisher, where, limit)
        except Exception as exc:  # noqa: BLE001 - broker or database still down: next sweep
            log.warning("lost-message sweep deferred: %s: %s", type(exc).__name__, str(exc)[:200])
            return count
        if sent:
            log.warning("queue of %s is empty but %d job(s) still wait: published them again", model, sent)
        count += sent
    return count
