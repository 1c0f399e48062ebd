"""Bad input through the running API: a 4xx in the OpenAI error shape naming the line and the
field, and nothing recorded or queued."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.support.processes import Stack

pytestmark = pytest.mark.integration


def _ok(i: int) -> dict[str, Any]:
    return {"custom_id": f"c{i}", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "hi"}}


@pytest.fixture()
def unchanged(stack: Stack, settings_for: Any) -> Iterator[None]:
    """Asserts that the test recorded no job and no batch."""
    from genq.shared.db import Batch, Job, session_factory

    factory = session_factory(settings_for().database_url)

    def counts() -> tuple[int, int]:
        with factory() as s:
            return s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.count()).select_from(Batch))

    before = counts()
    yield
    assert counts() == before


def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"type", "code", "message", "param"}
    return err


@pytest.mark.parametrize("body, param, words", [
    ({"model": "no-such-model", "prompt": "x"}, "body.model", "not in the registry"),
    ({"model": "tiny-gpt2", "prompt": "x", "temperature": 3}, "body.temperature", "less than or equal to 2"),
    ({"model": "tiny-gpt2", "prompt": "x", "top_p": 1.5}, "body.top_p", "less than or equal to 1"),
    ({"model": "tiny-gpt2", "prompt": "x", "max_tokens": 100000}, "body.max_tokens", "4096"),
    ({"model": "tiny-gpt2", "prompt": "x", "n": "three"}, "body.n", "integer"),
    ({"model": "tiny-gpt2", "prompt": "x", "bogus": 1}, "body.bogus", "unknown field"),
    ({"model": "tiny-gpt2"}, "body.prompt", "required"),
])
def test_single_job_bad_field(stack: Stack, unchanged: None, body: dict[str, Any], param: str, words: str) -> None:
    with stack.client() as c:
        err = _error(c.post("/v1/jobs", json={"url": "/v1/completions", "body": body}), 400)
    assert err["param"] == param and words in err["message"] and param in err["message"]
    assert err["type"] == "invalid_request_error"


def test_body_not_json(stack: Stack, unchanged: None) -> None:
    with stack.client() as c:
        for path in ("/v1/jobs", "/v1/batches"):
            err = _error(c.post(path, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
            assert err["code"] == "invalid_json" and "not valid JSON" in err["message"]


def test_malformed_ndjson_line_rejects_the_whole_batch(stack: Stack, unchanged: None) -> None:
    lines = [json.dumps(_ok(i)) for i in range(5)]
    lines[2] = lines[2][:-7]  # truncated line 3
    lines[4] = json.dumps({**_ok(4), "body": {"model": "tiny-gpt2", "prompt": "x", "top_k": -1}})
    body = ("\n".join(lines) + "\n").encode()
    with stack.client() as c:
        err = _error(c.post("/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"}), 400)
    assert err["message"].startswith("line 3: not valid JSON")
    assert err["line"] == 3
    assert [(e["line"], e["param"]) for e in err["errors"]] == [(3, None), (5, "body.top_k")]


def test_batch_line_errors_name_line_and_field(stack: Stack, unchanged: None) -> None:
    reqs = [_ok(0), {**_ok(1), "custom_id": "c0"}, {"url": "/v1/completions", "body": _ok(2)["body"]},
            {**_ok(3), "url": "/v1/edits"}, "just a string"]
    with stack.client() as c:
        err = _error(c.post("/v1/batches", json={"requests": reqs}), 400)
    got = [(e["line"], e["param"]) for e in err["errors"]]
    assert got == [(2, "custom_id"), (3, "custom_id"), (4, "url"), (5, None)]
    assert "duplicate of line 1" in err["errors"][0]["message"]


def test_batch_over_the_line_limit(stack: Stack, unchanged: None) -> None:
    line = json.dumps(_ok(0)).encode() + b"\n"
    with stack.client() as c:
        err = _error(c.post("/v1/batches", content=line * 50_001,
                            headers={"Content-Type": "application/x-ndjson"}), 413)
    assert err["code"] == "batch_too_large" and "50000" in err["message"]


def test_empty_batch_and_wrong_shapes(stack: Stack, unchanged: None) -> None:
    with stack.client() as c:
        assert _error(c.post("/v1/batches", json={"requests": []}), 400)["param"] == "requests"
        assert _error(c.post("/v1/batches", json={"requests": "x"}), 400)["param"] == "requests"
        assert _error(c.post("/v1/batches", json=[1, 2]), 400)["code"] == "invalid_request"
        assert _error(c.get("/v1/batches/batch_nope"), 404)["code"] == "not_found"
        assert _error(c.get("/v1/jobs/job_nope"), 404)["code"] == "not_found"
        assert _error(c.get("/v1/batches", params={"limit": 0}), 400)["param"] == "limit"
