"""Prometheus metrics read from the results database, so they cover every worker.

Job counts by model and status are read at each scrape. Queue-wait and run-time histograms are
fed incrementally with the jobs that finished since the previous scrape. No tenant data appears.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Job

_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
_RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class Metrics:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.registry = CollectorRegistry()
        self.jobs = Gauge("genq_jobs", "Jobs in the results database by model and status",
                          ["model", "status"], registry=self.registry)
        self.wait = Histogram("genq_job_queue_wait_seconds", "Time from submission to start",
                              ["model"], buckets=_WAIT_BUCKETS, registry=self.registry)
        self.run = Histogram("genq_job_run_seconds", "Time from start to a terminal state",
                             ["model", "status"], buckets=_RUN_BUCKETS, registry=self.registry)
        self._lock = threading.Lock()
        self._watermark = time.time()

    def _observe_finished(self, session: Session) -> None:
        q = (select(Job.model, Job.status, Job.created_at, Job.started_at, Job.finished_at)
             .where(Job.finished_at > self._watermark).order_by(Job.finished_at))
        for model, status, created, started, finished in session.execute(q).yield_per(5000):
            if started is not None:
                self.wait.labels(model).observe(max(0.0, started - created))
                self.run.labels(model, status).observe(max(0.0, finished - started))
            self._watermark = max(self._watermark, finished)

    def render(self) -> bytes:
        with self._lock, self.sessions() as session:
            self.jobs.clear()
            q = select(Job.model, Job.status, func.count()).group_by(Job.model, Job.status)
            for model, status, n in session.execute(q):
                self.jobs.labels(model, status).set(n)
            self._observe_finished(session)
        return generate_latest(self.registry)
