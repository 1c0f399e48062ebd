"""Background upkeep both kinds of process run, so queued work moves and batches end even when
only API processes or only workers are up: publish what the broker never got (the outbox), send
again what it lost, expire batches whose window closed, and finish batches whose finalizer died.

Every task is guarded in the database, so any number of processes may run them side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from genq.shared import fine_tuning_jobs, outbox
from genq.shared.broker import Publisher
from genq.shared.finalize import expire_batches, finalize_stale_batches
from genq.shared.storage import Storage

log = logging.getLogger("genq.upkeep")


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[], object]


def upkeep_tasks(sessions: sessionmaker[Session], storage: Storage, publisher: Publisher,
                 models: Sequence[str]) -> list[Task]:
    """The shared upkeep for jobs of `models` (a worker's own models, or every registered one)."""
    names = list(models)
    return [
        Task("publish unpublished jobs", lambda: outbox.sweep_unpublished(sessions, publisher, models=names)),
        Task("republish lost jobs", lambda: outbox.republish_lost(sessions, publisher, names)),
        Task("expire batches", lambda: expire_batches(sessions, storage)),
        Task("finalize stale batches", lambda: finalize_stale_batches(sessions, storage)),
        Task("publish unpublished fine-tuning jobs",
             lambda: fine_tuning_jobs.sweep_unpublished(sessions, publisher, names)),
    ]


def run_tasks(tasks: Sequence[Task]) -> None:
    """Run each task once; one that fails is logged and retried on the next pass, the rest still run."""
    for task in tasks:
        try:
            task.run()
        except Exception:
            log.exception("upkeep task %r failed; will retry", task.name)
