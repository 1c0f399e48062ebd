"""Prometheus metrics read from the results database, so they cover every worker.

Job counts by model and status are read at each scrape. Queue-wait and run-time histograms are
fed incrementally with the jobs that finished since the previous scrape. Worker metrics (model
cache, adapters, batches) come from the rows workers report every few seconds (workers/state.py);
a worker silent for WORKER_STALE_S drops out. No tenant data appears.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from genq.shared.db import Job, WorkerState

WORKER_STALE_S = 300.0
# (metric name, help, stats path under a model's entry, counter?)
_WORKER_MODEL_METRICS = (
    ("genq_worker_model_resident", "1 while the model is loaded in the worker", ("resident",), False),
    ("genq_worker_model_bytes", "Bytes the model's weights hold on the worker's device", ("bytes",), False),
    ("genq_worker_model_loads", "Model loads (a reload after an eviction counts again)", ("loads",), True),
    ("genq_worker_model_load_seconds", "Seconds spent loading the model", ("load_seconds",), True),
    ("genq_worker_model_evictions", "Times the model was unloaded to stay within the memory budget",
     ("evictions",), True),
    ("genq_worker_adapters_resident", "LoRA adapters loaded on the model", ("adapters", "resident"), False),
    ("genq_worker_adapter_loads", "LoRA adapter loads", ("adapters", "loads"), True),
    ("genq_worker_adapter_load_seconds", "Seconds spent loading LoRA adapters", ("adapters", "load_seconds"), True),
    ("genq_worker_adapter_evictions", "LoRA adapters unloaded to stay within max_adapters",
     ("adapters", "evictions"), True),
    ("genq_worker_batches", "Batched calls run (a continuous text batch counts once, whatever joins it)",
     ("batches", "batches"), True),
    ("genq_worker_batch_jobs", "Jobs served in batched calls", ("batches", "items"), True),
    ("genq_worker_batch_rows", "Rows (sequences or images) served in batched calls", ("batches", "rows"), True),
    ("genq_worker_batch_seconds", "Seconds spent in batched calls", ("batches", "seconds"), True),
    ("genq_worker_batch_splits", "Batched calls that failed and were retried in halves", ("batches", "splits"), True),
)


class _WorkerCollector(Collector):
    """Renders the worker rows read by the last scrape."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict[str, Any]]] = []

    def collect(self) -> Iterator[Metric]:
        budget = GaugeMetricFamily("genq_worker_memory_budget_bytes", "The worker's model memory budget (0: none)",
                                   labels=["worker"])
        families: list[Any] = [budget]
        for name, doc, _, counter in _WORKER_MODEL_METRICS:
            family = CounterMetricFamily if counter else GaugeMetricFamily
            families.append(family(name, doc, labels=["worker", "model"]))
        for worker, stats in self.rows:
            budget.add_metric([worker], float(stats.get("memory_budget_bytes") or 0))
            for model, entry in (stats.get("models") or {}).items():
                for family, (_, _, path, _) in zip(families[1:], _WORKER_MODEL_METRICS, strict=True):
                    value: Any = entry
                    for key in path:
                        value = value.get(key) if isinstance(value, dict) else None
                    if value is not None:
                        family.add_metric([worker, model], float(value))
        yield from families

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
        self.workers = _WorkerCollector()
        self.registry.register(self.workers)
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
            fresh = (select(WorkerState.id, WorkerState.stats)
                     .where(WorkerState.heartbeat_at > time.time() - WORKER_STALE_S))
            self.workers.rows = [(w, stats or {}) for w, stats in session.execute(fresh.order_by(WorkerState.id))]
            return generate_latest(self.registry)
