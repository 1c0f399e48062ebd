"""Listing, paging, models and metrics through the running API."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _echo_batch(c: Any, n: int, tag: str) -> dict[str, Any]:
    reqs = [{"custom_id": f"{tag}-{i}", "url": "/v1/completions", "body": {"model": "echo", "prompt": f"p{i}"}}
            for i in range(n)]
    resp = c.post("/v1/batches", json={"requests": reqs, "metadata": {"tag": tag}})
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_batches_list_newest_first_with_cursor(stack: Stack) -> None:
    with stack.client() as c:
        made = [_echo_batch(c, 2, f"list{i}")["id"] for i in range(5)]
        page1 = c.get("/v1/batches", params={"limit": 3}).json()
        page2 = c.get("/v1/batches", params={"limit": 3, "after": page1["last_id"]}).json()
    ids = [b["id"] for b in page1["data"]] + [b["id"] for b in page2["data"]]
    assert ids[:5] == made[::-1]
    assert page1["has_more"] is True and page1["object"] == "list"
    assert page1["data"][0]["metadata"] == {"tag": "list4"}


def test_batch_jobs_paging_and_status_filter(stack: Stack) -> None:
    with stack.client() as c:
        batch = _echo_batch(c, 7, "page")
        wait_for(lambda: c.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed", 60)
        first = c.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 4}).json()
        rest = c.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 4, "after": first["last_id"]}).json()
        assert [j["custom_id"] for j in first["data"] + rest["data"]] == [f"page-{i}" for i in range(7)]
        assert first["has_more"] and not rest["has_more"]
        assert c.get(f"/v1/batches/{batch['id']}/jobs", params={"status": "failed"}).json()["data"] == []
        assert len(c.get(f"/v1/batches/{batch['id']}/jobs", params={"status": "succeeded"}).json()["data"]) == 7
        bad = c.get(f"/v1/batches/{batch['id']}/jobs", params={"status": "done"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


def test_models_lists_registry_with_kind_and_queue(stack: Stack) -> None:
    with stack.client() as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert models["tiny-gpt2"]["kind"] == "text" and models["tiny-gpt2"]["queue"] == "genq.tiny-gpt2"
    assert models["echo"]["object"] == "model"


def test_metrics_count_jobs_and_observe_times(stack: Stack) -> None:
    def value(text: str, pattern: str) -> float:
        m = re.search(pattern + r" ([0-9.e+]+)", text)
        return float(m.group(1)) if m else 0.0

    with stack.client() as c:
        before = c.get("/metrics").text
        batch = _echo_batch(c, 5, "metrics")
        wait_for(lambda: c.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed", 60)
        after = c.get("/metrics").text
    ok = r'genq_jobs\{model="echo",status="succeeded"\}'
    assert value(after, ok) - value(before, ok) == 5
    run = r'genq_job_run_seconds_count\{model="echo",status="succeeded"\}'
    wait_ = r'genq_job_queue_wait_seconds_count\{model="echo"\}'
    assert value(after, run) - value(before, run) == 5
    assert value(after, wait_) - value(before, wait_) == 5
