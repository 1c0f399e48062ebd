"""What a worker reports about itself to the database for /metrics: the models it serves, its
model cache (resident models, sizes, loads, load time, evictions), its adapters and its batches.
The API renders these rows as Prometheus metrics, so one scrape covers every worker."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from genq.shared.db import WorkerState, session_scope
from genq.workers.watch import tolerate_unavailable

log = logging.getLogger("genq.worker")
_reporting = threading.Lock()  # two first reports at once (a model load and a job's end) both inserted


def worker_stats(runtime: Any) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, stats in runtime.cache.stats.items():
        entry = asdict(stats)  # loads, load_seconds, evictions, bytes, resident
        batches = runtime.batcher.stats.get(name)
        entry["batches"] = asdict(batches) if batches else {}
        runner = runtime.cache.loaded(name)
        if runner is not None and runner.adapters is not None:
            entry["adapters"] = runner.adapters.report()
        models[name] = entry
    return {"memory_budget_bytes": runtime.memory_budget, "models": models}


def report_state(runtime: Any) -> None:
    """Upsert this worker's row (best effort: a database blip only delays the report)."""
    now = time.time()
    with _reporting, tolerate_unavailable("worker state"), session_scope(runtime.sessions) as s:
        row = s.get(WorkerState, runtime.worker_id)
        if row is None:
            row = WorkerState(id=runtime.worker_id, models=list(runtime.models), device=str(runtime.device or "auto"),
                              started_at=runtime.started_at, heartbeat_at=now, stats={})
            s.add(row)
        row.heartbeat_at = now
        row.stats = worker_stats(runtime)
