"""Text jobs end to end: HTTP API -> Redis -> genq worker (transformers, tiny-gpt2) -> S3 and Postgres."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _line(i: int, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny-gpt2", "prompt": f"The number {i} is", "max_tokens": 8, **body}}


def _wait_terminal(client: Any, batch_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["status"]
                    in ("completed", "cancelled", "failed", "expired") and b, timeout, 0.2, f"batch {batch_id}")


def test_bulk_batch_completes_with_every_output_in_storage(stack: Stack, settings_for: Any) -> None:
    from genq.shared.storage import storage_from_settings

    lines = [_line(i, seed=i, temperature=0.8) for i in range(40)]
    ndjson = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with stack.client() as c:
        resp = c.post("/v1/batches", content=ndjson, headers={"Content-Type": "application/x-ndjson"})
        assert resp.status_code == 202, resp.text
        batch = resp.json()
        assert batch["status"] == "in_progress"
        assert batch["request_counts"]["total"] == 40

        # Counts are true at every moment: they always add up to the total.
        seen_statuses = set()

        def done() -> dict[str, Any] | None:
            b = c.get(f"/v1/batches/{batch['id']}").json()
            rc = b["request_counts"]
            assert rc["completed"] + rc["failed"] + rc["cancelled"] + rc["running"] + rc["queued"] == 40
            seen_statuses.add(b["status"])
            return b if b["status"] == "completed" else None

        final = wait_for(done, 180, 0.1, "batch completed")
        assert final["request_counts"]["completed"] == 40 and final["request_counts"]["failed"] == 0
        assert final["completed_at"] >= final["in_progress_at"] >= final["created_at"]
        assert final["finalizing_at"] is not None and final["output_file_id"] and final["error_file_id"] is None

        results = [json.loads(x) for x in c.get(f"/v1/batches/{batch['id']}/results").text.splitlines()]
        jobs = c.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 1000}).json()["data"]

    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(40)]  # input order
    storage = storage_from_settings(settings_for())
    for r, job in zip(results, jobs, strict=True):
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and r["error"] is None
        assert body["object"] == "text_completion" and body["model"] == "tiny-gpt2"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 8
        assert job["status"] == "succeeded" and job["attempts"] == 1 and job["progress"] == 1.0
        assert body == job["result"]
    # The batch's output file was written to storage at finalization, in input order.
    from genq.shared.db import File, session_factory

    with session_factory(settings_for().database_url)() as s:
        f = s.get(File, final["output_file_id"])
        lines_out = [json.loads(x) for x in storage.get(f.key).decode().splitlines()]
    assert [x["custom_id"] for x in lines_out] == [f"req-{i}" for i in range(40)]


def test_same_seed_same_text_different_seed_different_text(stack: Stack) -> None:
    body = {"model": "tiny-gpt2", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0}
    with stack.client() as c:
        ids = [c.post("/v1/jobs", json={"url": "/v1/completions", "body": {**body, "seed": seed}}).json()["id"]
               for seed in (11, 11, 12)]
        jobs = [wait_for(lambda j=j: (x := c.get(f"/v1/jobs/{j}").json())["status"] == "succeeded" and x,
                         60, 0.1, f"job {j}") for j in ids]
    texts = [j["result"]["choices"][0]["text"] for j in jobs]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_cancel_queued_batch_never_runs_its_jobs(stack: Stack) -> None:
    # No worker serves tiny-gpt2-idle yet, so every job stays queued until the cancel.
    lines = [{**_line(i), "body": {**_line(i)["body"], "model": "tiny-gpt2-idle"}} for i in range(10)]
    with stack.client() as c:
        batch = c.post("/v1/batches", json={"requests": lines}).json()
        assert batch["request_counts"]["queued"] == 10
        cancelled = c.post(f"/v1/batches/{batch['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["request_counts"]["cancelled"] == 10
        assert cancelled["cancelling_at"] and cancelled["cancelled_at"]
        again = c.post(f"/v1/batches/{batch['id']}/cancel")  # idempotent
        assert again.status_code == 200 and again.json()["status"] == "cancelled"

        # A worker that now consumes the queue must skip every cancelled job.
        w = stack.start_worker("tiny-gpt2-idle", name="worker-idle")
        stack.wait_worker_ready(w, "worker-idle")
        log = stack.logdir / "worker-idle.log"
        jobs = c.get(f"/v1/batches/{batch['id']}/jobs").json()["data"]
        # (Other tests may have left cancelled jobs for this model in the queue too.)
        wait_for(lambda: all(f"job {j['id']} skipped (cancelled)" in log.read_text() for j in jobs), 60,
                 what="worker drained the queue")
        jobs = c.get(f"/v1/batches/{batch['id']}/jobs").json()["data"]
        assert all(j["status"] == "cancelled" and j["attempts"] == 0 and j["started_at"] is None for j in jobs)
        results = [json.loads(x) for x in c.get(f"/v1/batches/{batch['id']}/results").text.splitlines()]
        assert [r["error"]["code"] for r in results] == ["batch_cancelled"] * 10
    # Other tests count on no worker serving tiny-gpt2-idle.
    os.killpg(w.pid, signal.SIGTERM)
    w.wait(30)


def test_cancel_running_job(stack: Stack) -> None:
    with stack.client() as c:
        job = c.post("/v1/jobs", json={"url": "/v1/completions",
                                       "body": {"model": "slow-echo", "prompt": "x"}}).json()
        w = stack.start_worker("slow-echo", name="worker-slow-cancel")
        wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["progress"] > 0, 60, what="job running")
        out = c.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert out["status"] == "cancelled"
        log = stack.logdir / "worker-slow-cancel.log"
        wait_for(lambda: f"job {job['id']} cancelled" in log.read_text(), 30, what="worker stopped the job")
        final = c.get(f"/v1/jobs/{job['id']}").json()
        assert final["status"] == "cancelled" and final["result"] is None
        w.terminate()
