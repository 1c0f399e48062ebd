"""Fast API checks with an in-process app (SQLite, file storage, in-memory broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from openai.types import Model
from openai.types.shared import ErrorObject
from sqlalchemy import update

from genq.shared.db import Job, session_scope
from tests.support.app import api_client


def _app(tmp_path: Path, broker: str = "memory://", **limits: int) -> TestClient:
    return api_client(tmp_path, broker_url=broker, limits=limits, maintenance=True)


def test_readyz_reports_a_broken_broker(tmp_path: Path) -> None:
    with _app(tmp_path, broker="redis://127.0.0.1:1/0") as c:
        resp = c.get("/readyz")
        assert c.get("/healthz").json() == {"status": "ok"}
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["database"] == "ok" and checks["storage"] == "ok" and checks["broker"].startswith("error")


def test_limits_are_enforced(tmp_path: Path) -> None:
    line = b'{"custom_id":"a","url":"/v1/completions","body":{"model":"tiny-gpt2","prompt":"x"}}\n'
    with _app(tmp_path, max_batch_lines=3, max_body_bytes=1000) as c:
        ok = c.post("/v1/batches", content=line.replace(b'"a"', b'"b"') + line,
                    headers={"Content-Type": "application/x-ndjson"})
        too_many = c.post("/v1/batches", content=b"".join(line.replace(b'"a"', f'"{i}"'.encode()) for i in range(4)),
                          headers={"Content-Type": "application/x-ndjson"})
        too_big = c.post("/v1/jobs", content=b" " * 1001, headers={"Content-Type": "application/json"})
    assert ok.status_code == 202
    assert too_many.status_code == 413 and "at most 3 lines, got 4" in too_many.json()["error"]["message"]
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"


def test_image_url_is_refused_for_a_text_model(tmp_path: Path) -> None:
    with _app(tmp_path) as c:
        resp = c.post("/v1/jobs", json={"url": "/v1/images/generations", "body": {"model": "tiny-gpt2", "prompt": "x"}})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "body.model" and "text model" in resp.json()["error"]["message"]


def test_a_file_whose_object_is_gone_is_a_404_not_a_500(tmp_path: Path) -> None:
    with _app(tmp_path) as c:
        up = c.post("/v1/files", data={"purpose": "batch"},
                    files={"file": ("in.jsonl", b'{"custom_id":"a","url":"/v1/completions","body":{}}\n')})
        assert up.status_code == 200, up.text
        assert c.get(f"/v1/files/{up.json()['id']}/content").status_code == 200
        for stored in (tmp_path / "obj").rglob("*"):
            if stored.is_file():
                stored.unlink()
        resp = c.get(f"/v1/files/{up.json()['id']}/content")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "object_not_found"


def test_a_model_is_read_alone_as_in_the_list(tmp_path: Path) -> None:
    with _app(tmp_path) as c:
        listed = c.get("/v1/models").json()
        one = c.get("/v1/models/tiny-gan")
        missing = c.get("/v1/models/nope")
    assert set(listed) == {"object", "data"} and listed["object"] == "list"
    assert one.status_code == 200 and one.json() == next(m for m in listed["data"] if m["id"] == "tiny-gan")
    for model in listed["data"]:
        assert Model.model_validate(model).object == "model"
    assert one.json()["kind"] == "gan" and one.json()["queue"] == "genq.tiny-gan"
    assert missing.status_code == 404
    error = ErrorObject.model_validate(missing.json()["error"])
    assert (error.type, error.code, error.param) == ("invalid_request_error", "model_not_found", "model")


def test_jobs_and_batches_show_the_priority_they_are_served_at(tmp_path: Path) -> None:
    def line(cid: str, **extra: int) -> dict:
        return {"custom_id": cid, "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "x"}, **extra}

    with _app(tmp_path) as c:
        plain = c.post("/v1/jobs", json=line("a")).json()
        urgent = c.post("/v1/jobs", json=line("b", priority=9)).json()
        batch = c.post("/v1/batches", json={"requests": [line("c"), line("d", priority=2)], "priority": 5}).json()
        default = c.post("/v1/batches", json={"requests": [line("e")]}).json()
        jobs = {j["custom_id"]: j["priority"] for b in (batch, default)
                for j in c.get(f"/v1/batches/{b['id']}/jobs").json()["data"]}
        again = c.get(f"/v1/jobs/{plain['id']}").json()
        # A row stored before genq stored the effective priority shows it too.
        with session_scope(c.app.state.genq.sessions) as s:  # type: ignore[attr-defined]
            s.execute(update(Job).where(Job.id == urgent["id"]).values(priority=None))
        legacy = c.get(f"/v1/jobs/{urgent['id']}").json()
    assert legacy["priority"] == 0
    assert (plain["priority"], again["priority"], urgent["priority"]) == (0, 0, 9)
    assert (batch["priority"], default["priority"]) == (5, 0)
    assert jobs == {"c": 5, "d": 2, "e": 0}  # a line without its own inherits its batch's


def test_a_repeated_synchronous_request_answers_its_first_job(tmp_path: Path) -> None:
    body = {"model": "tiny-gpt2", "prompt": "once"}
    key = {"Idempotency-Key": "sync-key-1"}
    with _app(tmp_path) as c:  # no worker: the first request waits start_timeout, then its job is cancelled
        first = c.post("/v1/completions", params={"start_timeout": 0.1}, json=body, headers=key)
        again = c.post("/v1/completions", params={"start_timeout": 0.1}, json=body, headers=key)
        with c.app.state.genq.sessions() as s:  # type: ignore[attr-defined]
            jobs = s.query(Job).all()
    assert first.status_code == 503 and first.json()["error"]["code"] == "no_worker_available"
    assert len(jobs) == 1 and jobs[0].status == "cancelled"
    assert again.status_code == 409 and again.json()["error"]["code"] == "cancelled"
    assert jobs[0].id in again.json()["error"]["message"]  # the same job, not a new one



def test_batch_metadata_follows_openais_limits(tmp_path: Path) -> None:
    line = {"custom_id": "a", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "x"}}

    def create(metadata: object) -> Any:
        return c.post("/v1/batches", json={"requests": [line], "metadata": metadata})

    with _app(tmp_path) as c:
        ok = create({f"k{i}": "v" * 512 for i in range(15)} | {"k" * 64: "v"})
        refused = {"17 pairs": create({f"k{i}": "v" for i in range(17)}),
                   "a long key": create({"k" * 65: "v"}),
                   "a long value": create({"k": "v" * 513}),
                   "a number": create({"k": 1})}
        documented = c.get("/openapi.json").json()
    assert ok.status_code == 202, ok.text
    assert ok.json()["metadata"]["k" * 64] == "v"
    for what, resp in refused.items():
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["code"] == "invalid_request", (what, resp.text)
        assert err["param"].startswith("metadata") and err["message"].startswith(err["param"] + ": "), (what, err)
    assert refused["a long value"].json()["error"]["param"] == "metadata.k"
    body = documented["paths"]["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    meta = next(s for s in body["properties"]["metadata"]["anyOf"] if s.get("type") == "object")
    assert meta["maxProperties"] == 16 and meta["propertyNames"]["maxLength"] == 64
    assert meta["additionalProperties"] == {"type": "string", "maxLength": 512}
