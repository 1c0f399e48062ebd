"""Idempotency keys, retry of failed requests, and expiry of a batch's completion window."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.support.openai_shapes import check_output_line
from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _line(cid: str, model: str = "echo", prompt: str = "hi") -> dict[str, Any]:
    url = "/v1/images/generations" if model == "tiny-gan" else "/v1/completions"
    body = {"model": model, "prompt": prompt} | ({"size": "32x32"} if model == "tiny-gan" else {})
    return {"custom_id": cid, "url": url, "body": body}


def _terminal(c: httpx.Client, batch_id: str, timeout: float = 90) -> dict[str, Any]:
    return wait_for(lambda: (b := c.get(f"/v1/batches/{batch_id}").json())["status"]
                    in ("completed", "failed", "expired", "cancelled") and b, timeout, 0.2, f"batch {batch_id}")


def test_idempotency_keys(stack: Stack) -> None:
    with stack.client() as c:
        job_body = _line("one")
        first = c.post("/v1/jobs", json=job_body, headers={"Idempotency-Key": "job-key-1"})
        again = c.post("/v1/jobs", json=job_body, headers={"Idempotency-Key": "job-key-1"})
        assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
        other = c.post("/v1/jobs", json=_line("two"), headers={"Idempotency-Key": "job-key-1"})
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
        fresh = c.post("/v1/jobs", json=job_body)
        assert fresh.json()["id"] != first.json()["id"]

        reqs = {"requests": [_line("a"), _line("b")]}
        b1 = c.post("/v1/batches", json=reqs, headers={"Idempotency-Key": "batch-key-1"}).json()
        b2 = c.post("/v1/batches", json=reqs, headers={"Idempotency-Key": "batch-key-1"}).json()
        assert b1["id"] == b2["id"]
        assert c.post("/v1/batches", json={"requests": [_line("c")]},
                      headers={"Idempotency-Key": "batch-key-1"}).status_code == 409
        listed = [b["id"] for b in c.get("/v1/batches", params={"limit": 100}).json()["data"]]
        assert listed.count(b1["id"]) == 1

        files = [c.post("/v1/files", files={"file": ("f.jsonl", b'{"x": 1}\n')}, data={"purpose": "batch"},
                        headers={"Idempotency-Key": "file-key-1"}).json() for _ in range(2)]
        assert files[0]["id"] == files[1]["id"]
        clash = c.post("/v1/files", files={"file": ("f.jsonl", b'{"x": 2}\n')}, data={"purpose": "batch"},
                       headers={"Idempotency-Key": "file-key-1"})
        assert clash.status_code == 409


def test_retry_creates_a_batch_of_the_failed_requests(stack: Stack) -> None:
    lines = [_line("good-1", "tiny-gan", "cat"), _line("bad-1", "tiny-gan", "zebra"),
             _line("good-2", "tiny-gan", "dog"), _line("bad-2", "tiny-gan", "yak")]
    with stack.client() as c:
        batch = c.post("/v1/batches", json={"requests": lines, "metadata": {"run": "7"}}).json()
        done = _terminal(c, batch["id"])
        assert done["request_counts"]["completed"] == 2 and done["request_counts"]["failed"] == 2
        # retry_of takes a metadata pair of its own: 1 + 15 more would be 17, over OpenAI's 16.
        crowded = c.post(f"/v1/batches/{batch['id']}/retry", json={"metadata": {f"k{i}": "v" for i in range(15)}})
        assert crowded.status_code == 400 and crowded.json()["error"]["param"] == "metadata", crowded.text
        retry = c.post(f"/v1/batches/{batch['id']}/retry")
        assert retry.status_code == 202, retry.text
        again = retry.json()
        assert again["metadata"] == {"run": "7", "retry_of": batch["id"]}
        assert again["request_counts"]["total"] == 2
        jobs = c.get(f"/v1/batches/{again['id']}/jobs").json()["data"]
        assert [j["custom_id"] for j in jobs] == ["bad-1", "bad-2"]
        _terminal(c, again["id"])
        clean = _terminal(c, c.post("/v1/batches", json={"requests": [_line("x")]}).json()["id"])
        nothing = c.post(f"/v1/batches/{clean['id']}/retry")
        assert nothing.status_code == 400 and nothing.json()["error"]["code"] == "nothing_to_retry"


def test_expired_window_cancels_unstarted_work_and_keeps_results(stack: Stack) -> None:
    lines = [_line("fast-1"), _line("fast-2")] + [_line(f"idle-{i}", "tiny-gpt2-idle") for i in range(3)]
    with stack.client() as c:
        batch = c.post("/v1/batches", json={"requests": lines, "completion_window": "3s"}).json()
        assert batch["expires_at"] - batch["created_at"] in (2, 3, 4)
        done = _terminal(c, batch["id"], timeout=60)
        assert done["status"] == "expired" and done["expired_at"] is not None
        assert done["request_counts"]["completed"] == 2 and done["request_counts"]["cancelled"] == 3
        results = [json.loads(x) for x in c.get(f"/v1/batches/{batch['id']}/results").text.splitlines()]
        assert [r["custom_id"] for r in results] == [x["custom_id"] for x in lines]
        assert {r["error"]["code"] for r in results[2:]} == {"batch_expired"}
        assert done["output_file_id"] and done["error_file_id"]
        # As OpenAI writes them: the successes in the output file, and each request the window
        # closed on in the error file, with `error` and no response.
        output, errors = ([check_output_line(json.loads(x)) for x in c.get(f"/v1/files/{file_id}/content").text
                           .splitlines()] for file_id in (done["output_file_id"], done["error_file_id"]))
        assert [(o.custom_id, o.response.status_code) for o in output] == [  # type: ignore[union-attr]
            ("fast-1", 200), ("fast-2", 200)]
        assert [(e.custom_id, e.response, e.error.code) for e in errors] == [  # type: ignore[union-attr]
            (f"idle-{i}", None, "batch_expired") for i in range(3)]
        bad = c.post("/v1/batches", json={"requests": lines, "completion_window": "forever"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "completion_window"
