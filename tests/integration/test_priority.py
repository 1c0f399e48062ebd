"""Priorities end to end: a high-priority job submitted behind 1,000 queued low-priority jobs for
the same model starts before them (API -> Redis priority lists -> a genq worker).

The jobs queue while no worker serves `prio-echo`; a worker started afterwards drains the queue, so
the order it takes them in is the broker's order alone."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MODEL = "prio-echo"  # test registry: kind echo, and no worker in the shared stack


def _line(tag: str, i: int, priority: int | None) -> dict[str, Any]:
    line: dict[str, Any] = {"custom_id": f"{tag}-{i}", "url": "/v1/completions",
                            "body": {"model": MODEL, "prompt": f"{tag} {i}"}}
    if priority is not None:
        line["priority"] = priority
    return line


def _batch(c: httpx.Client, tag: str, n: int, priority: int | None) -> str:
    resp = c.post("/v1/batches", json={"requests": [_line(tag, i, priority) for i in range(n)]})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]  # type: ignore[no-any-return]


def _job(c: httpx.Client, tag: str, priority: int | None) -> str:
    resp = c.post("/v1/jobs", json=_line(tag, 0, priority))
    assert resp.status_code == 202, resp.text
    assert resp.json()["priority"] == (0 if priority is None else priority)  # the default is shown
    return resp.json()["id"]  # type: ignore[no-any-return]


@contextmanager
def _worker(stack: Stack, name: str) -> Iterator[Any]:
    # One job at a time (a solo pool), so the order jobs finish in is the order they were taken in.
    proc = stack.start_worker(MODEL, "--concurrency", "1", name=name)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def _wait_done(c: httpx.Client, batch_id: str, job_id: str, timeout: float) -> None:
    wait_for(lambda: c.get(f"/v1/batches/{batch_id}").json()["status"] == "completed"
             and c.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", timeout, 0.5,
             f"batch {batch_id} and job {job_id} done")


def _started(settings: Any, batch_id: str, job_id: str) -> tuple[float, list[float]]:
    """Start times at full precision (the API shows whole seconds)."""
    from sqlalchemy import select

    from genq.shared.db import Job, session_factory

    with session_factory(settings.database_url)() as s:
        single = s.execute(select(Job.started_at).where(Job.id == job_id)).scalar_one()
        batch = list(s.execute(select(Job.started_at).where(Job.batch_id == batch_id)).scalars())
    return single, batch


def _log_order(stack: Stack, name: str) -> list[str]:
    """Job ids in the order the worker logged them as finished (solo pool: one at a time)."""
    text = (stack.logdir / f"{name}.log").read_text(errors="replace")
    return re.findall(r"genq\.worker: job (job_\w+) succeeded", text)


def test_high_priority_job_overtakes_a_thousand_queued_low_priority_jobs(stack: Stack, settings_for: Any) -> None:
    with stack.client() as c:
        batch_id = _batch(c, "low", 1000, priority=0)
        high = _job(c, "high", priority=9)  # submitted last, behind all 1,000
        assert c.get(f"/v1/batches/{batch_id}").json()["request_counts"]["queued"] == 1000
        with _worker(stack, "worker-prio-echo"):
            _wait_done(c, batch_id, high, 300)

    single, batch = _started(settings_for(), batch_id, high)
    assert len(batch) == 1000 and None not in batch
    assert single <= min(batch)
    order = _log_order(stack, "worker-prio-echo")
    assert len(order) == 1001 and order[0] == high


def test_without_priority_the_last_job_submitted_runs_last(stack: Stack, settings_for: Any) -> None:
    """The control: with no priority to tell them apart, the queue is first in, first out, so the
    result above is the priority's doing."""
    with stack.client() as c:
        batch_id = _batch(c, "fifo", 20, priority=None)
        last = _job(c, "fifo-last", priority=None)
        with _worker(stack, "worker-prio-echo-fifo"):
            _wait_done(c, batch_id, last, 120)

    single, batch = _started(settings_for(), batch_id, last)
    assert single > max(batch)
    order = _log_order(stack, "worker-prio-echo-fifo")
    assert len(order) == 21 and order[-1] == last
