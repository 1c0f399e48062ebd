"""Progress reports and cancel checks for every job a worker holds, one database round trip each
per period however many jobs share a batch. Both are best effort: a database blip must not fail
the work, so errors that mean "database unavailable" are logged and skipped."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session, sessionmaker

from genq.shared.db import Job, is_unavailable, session_scope

log = logging.getLogger("genq.worker")


@contextmanager
def tolerate_unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        log.warning("skipped a %s update: database unavailable", what)


class JobWatch:
    def __init__(self, sessions: sessionmaker[Session], worker_id: str, *, period_s: float = 0.25,
                 stopping: threading.Event | None = None) -> None:
        self.sessions, self.worker_id, self.period_s = sessions, worker_id, period_s
        self.stopping = stopping or threading.Event()
        self._held: set[str] = set()
        self._cancelled: set[str] = set()
        self._progress: dict[str, float] = {}
        self._checked = self._flushed = 0.0
        self._check_lock, self._progress_lock = threading.Lock(), threading.Lock()

    def add(self, job_id: str) -> None:
        with self._check_lock:
            self._held.add(job_id)

    def remove(self, job_id: str) -> None:
        with self._check_lock:
            self._held.discard(job_id)
            self._cancelled.discard(job_id)
        with self._progress_lock:
            self._progress.pop(job_id, None)

    def cancelled(self, job_id: str) -> bool:
        """Whether the job was cancelled (or the worker is stopping: then it is handed back)."""
        if self.stopping.is_set():
            return True
        with self._check_lock:
            if time.monotonic() - self._checked >= self.period_s and self._held:
                self._checked = time.monotonic()
                with tolerate_unavailable("cancel check"), session_scope(self.sessions) as s:
                    q = select(Job.id).where(Job.id.in_(sorted(self._held)), Job.status == "cancelled")
                    self._cancelled.update(s.scalars(q))
            return job_id in self._cancelled

    def progress(self, job_id: str, value: float) -> None:
        with self._progress_lock:
            self._progress[job_id] = max(0.0, min(1.0, value))
            if time.monotonic() - self._flushed < self.period_s:
                return
            self._flushed = time.monotonic()
            pending, self._progress = self._progress, {}
            rows = [{"job_id": j, "p": p} for j, p in pending.items()]
            with tolerate_unavailable("progress"), session_scope(self.sessions) as s:
                table = Job.__table__
                stmt = (update(table).where(table.c.id == bindparam("job_id"), table.c.status == "running",
                                            table.c.worker == self.worker_id).values(progress=bindparam("p")))
                s.connection().execute(stmt, rows)
