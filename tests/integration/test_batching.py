"""Worker batching, the model cache and LoRA adapters end to end: HTTP API -> Redis -> genq workers
-> S3 and Postgres, with what /metrics reports about it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _wait_done(c: httpx.Client, batch_id: str, timeout: float = 180) -> dict[str, Any]:
    return wait_for(lambda: (b := c.get(f"/v1/batches/{batch_id}").json())["status"]
                    in ("completed", "cancelled", "failed", "expired") and b, timeout, 0.2, f"batch {batch_id}")


def _results(c: httpx.Client, batch_id: str) -> dict[str, dict[str, Any]]:
    lines = [json.loads(x) for x in c.get(f"/v1/batches/{batch_id}/results").content.splitlines()]
    return {line["custom_id"]: line for line in lines}


def _metric(c: httpx.Client, name: str, model: str) -> float:
    """Sum of a worker metric over the workers serving `model`."""
    text = c.get("/metrics").text
    values = re.findall(rf'^{name}\{{model="{re.escape(model)}",worker="[^"]*"\}} (\S+)$', text, re.M)
    values += re.findall(rf'^{name}\{{worker="[^"]*",model="{re.escape(model)}"\}} (\S+)$', text, re.M)
    return sum(float(v) for v in values)


@contextmanager
def _worker(stack: Stack, models: str, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    name = f"worker-{models.replace(',', '+')}-{uuid.uuid4().hex[:4]}"
    proc = stack.start_worker(models, *extra, name=name)
    try:
        stack.wait_worker_ready(proc, name, timeout=120)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _submit(c: httpx.Client, lines: list[dict[str, Any]]) -> str:
    resp = c.post("/v1/batches", json={"requests": lines})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_queued_jobs_share_batched_calls_and_a_failing_job_fails_alone(stack: Stack) -> None:
    lines = [{"custom_id": f"e{i}", "url": "/v1/completions",
              "body": {"model": "batch-echo", "prompt": "boom" if i == 5 else f"hello {i}"}} for i in range(24)]
    with stack.client() as c:
        batch_id = _submit(c, lines)  # queued before the worker starts: it finds full batches waiting
        with _worker(stack, "batch-echo"):
            batch = _wait_done(c, batch_id, 120)
            assert batch["status"] == "completed"
            counts = batch["request_counts"]
            assert (counts["total"], counts["completed"], counts["failed"]) == (24, 23, 1)
            results = _results(c, batch_id)
            failed = results["e5"]["response"]
            assert results["e5"]["error"] is None and failed["status_code"] == 500
            assert failed["body"]["error"]["code"] == "runtime_error"
            assert failed["body"]["error"]["type"] == "server_error"
            assert "failed on prompt 'boom'" in failed["body"]["error"]["message"]
            assert all(results[f"e{i}"]["response"]["body"]["choices"][0]["text"] == f"hello {i}"
                       for i in range(24) if i != 5)
            # The jobs shared calls of up to max_batch_size (8), and the failing call was split.
            wait_for(lambda: _metric(c, "genq_worker_batch_jobs_total", "batch-echo") >= 24, 30, 0.5, "metrics")
            batches = _metric(c, "genq_worker_batches_total", "batch-echo")
            assert batches < 24 / 2, batches
            assert _metric(c, "genq_worker_batch_splits_total", "batch-echo") >= 1


def test_a_job_cancelled_inside_a_running_batch_is_cancelled_alone(stack: Stack) -> None:
    lines = [{"custom_id": f"c{i}", "url": "/v1/completions",
              "body": {"model": "batch-echo", "prompt": f"cancel test {i}"}} for i in range(6)]
    with stack.client() as c, _worker(stack, "batch-echo"):
        batch_id = _submit(c, lines)
        jobs = c.get(f"/v1/batches/{batch_id}/jobs", params={"limit": 10}).json()["data"]
        victim = next(j["id"] for j in jobs if j["custom_id"] == "c2")
        wait_for(lambda: c.get(f"/v1/jobs/{victim}").json()["status"] == "running", 30, 0.02, "c2 running")
        assert c.post(f"/v1/jobs/{victim}/cancel").status_code == 200
        batch = _wait_done(c, batch_id, 60)
        counts = batch["request_counts"]
        assert (counts["completed"], counts["failed"], counts["cancelled"]) == (5, 0, 1)
        job = c.get(f"/v1/jobs/{victim}").json()
        assert job["status"] == "cancelled" and job["result"] is None


def test_greedy_text_is_the_same_batched_and_one_at_a_time(stack: Stack) -> None:
    prompts = ["The queue", "A worker on a GPU", "x", "Batches of jobs wait for", "Hello", "One two three four"]
    bodies = [{"model": "tiny-gpt2", "prompt": p, "max_tokens": 10 + i, "temperature": 0}
              for i, p in enumerate(prompts)]
    seeded = [{"model": "tiny-gpt2", "prompt": p, "max_tokens": 8, "seed": 11 + i, "top_p": 0.9}
              for i, p in enumerate(prompts)]
    with stack.client() as c:
        before = _metric(c, "genq_worker_batch_jobs_total", "tiny-gpt2")
        batch_id = _submit(c, [{"custom_id": f"b{i}", "url": "/v1/completions", "body": b}
                               for i, b in enumerate(bodies + seeded)])
        assert _wait_done(c, batch_id)["request_counts"]["completed"] == len(bodies) * 2
        batched = _results(c, batch_id)
        for i, body in enumerate(bodies + seeded):  # each alone, waiting for one before the next
            alone = c.post("/v1/completions", json=body)
            assert alone.status_code == 200, alone.text
            assert alone.json()["choices"] == batched[f"b{i}"]["response"]["body"]["choices"]
        wait_for(lambda: _metric(c, "genq_worker_batch_jobs_total", "tiny-gpt2") >= before + 24, 30, 0.5, "metrics")


def test_adapters_end_to_end_change_only_their_own_requests(stack: Stack, tiny_registry: Path,
                                                            tmp_path: Path) -> None:
    """An uploaded LoRA adapter runs on the tiny-gpt2 worker, batched with plain requests; the
    outputs equal the runner's own in-process answers for each."""
    from genq.client import archive_adapter
    from genq.shared.registry import load_registry
    from genq.shared.schemas import CompletionBody
    from genq.workers.runners.base import LocalAdapter, RunContext
    from genq.workers.runners.text import TextRunner
    from genq.workers.tiny_lora import build_text_lora

    lora = build_text_lora(tiny_registry.parent / "tiny-gpt2", tmp_path / "lora", seed=7)
    name = f"style-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        resp = c.post("/v1/adapters", data={"name": name, "model": "tiny-gpt2"},
                      files={"file": ("lora.tar.gz", archive_adapter(lora), "application/gzip")})
        assert resp.status_code == 200, resp.text
        adapter_id = resp.json()["id"]
        body = {"model": "tiny-gpt2", "prompt": "The station", "max_tokens": 12, "temperature": 0}
        lines = [{"custom_id": f"r{i}", "url": "/v1/completions",
                  "body": {**body, "adapter": name} if i % 2 else body} for i in range(8)]
        batch_id = _submit(c, lines)
        assert _wait_done(c, batch_id)["request_counts"]["completed"] == 8
        texts = {k: v["response"]["body"]["choices"][0]["text"] for k, v in _results(c, batch_id).items()}

    spec = load_registry(tiny_registry).get("tiny-gpt2")
    runner = TextRunner(spec, device="cpu")  # type: ignore[arg-type]
    runner.load()
    plain = runner.run(CompletionBody.model_validate(body), RunContext())["choices"][0]["text"]
    styled = runner.run(CompletionBody.model_validate({**body, "adapter": adapter_id}), RunContext(),
                        LocalAdapter(adapter_id, lora))["choices"][0]["text"]
    assert plain != styled
    assert texts == {f"r{i}": styled if i % 2 else plain for i in range(8)}


def test_a_fine_tuned_model_answers_as_its_base_with_its_adapter(stack: Stack, tiny_registry: Path, tmp_path: Path,
                                                                 pg_url: str, settings_for: Any) -> None:
    """A fine-tuned model, registered as the training worker registers one, through the openai
    package: the tiny-chat worker generates with its adapter (the same text as naming the base model
    and the adapter, not the base's own), and the answer and its stream say the ft: name."""
    import openai

    from genq.shared.db import session_factory
    from genq.shared.storage import storage_from_settings
    from genq.workers.tiny_lora import build_text_lora
    from tests.support.fine_tuned import register_fine_tuned

    lora = build_text_lora(tiny_registry.parent / "tiny-chat", tmp_path / "lora", seed=5)
    with session_factory(pg_url)() as session:
        ft = register_fine_tuned(session, storage_from_settings(settings_for()), tenant=None, base="tiny-chat",
                                 adapter_dir=lora, suffix="style")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-local", max_retries=0, timeout=120)
    ask: dict[str, Any] = {"messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 12,
                           "temperature": 0}
    tuned = client.chat.completions.create(model=ft.name, **ask)
    assert tuned.model == ft.name
    with stack.client() as c:
        same = c.post("/v1/chat/completions", json={"model": "tiny-chat", "adapter": ft.id, **ask}).json()
        plain = c.post("/v1/chat/completions", json={"model": "tiny-chat", **ask}).json()
    assert same["model"] == "tiny-chat" and plain["model"] == "tiny-chat"
    assert tuned.choices[0].message.content == same["choices"][0]["message"]["content"]
    assert tuned.choices[0].message.content != plain["choices"][0]["message"]["content"]  # the adapter ran

    chunks = list(client.chat.completions.create(model=ft.name, stream=True, **ask))
    assert {chunk.model for chunk in chunks} == {ft.name}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        tuned.choices[0].message.content

    assert ft.name in [m.id for m in client.models.list()]
    assert client.models.delete(ft.name).deleted
    with pytest.raises(openai.BadRequestError) as gone:
        client.chat.completions.create(model=ft.name, **ask)
    assert gone.value.code == "model_not_found"


def test_a_worker_serving_two_models_keeps_them_within_its_memory_budget(stack: Stack,
                                                                         tiny_registry: Path) -> None:
    weights = sum(p.stat().st_size for p in (tiny_registry.parent / "tiny-gpt2").glob("*.safetensors"))
    budget = str(int(weights * 1.5))  # room for one of the two models, not both
    body = {"prompt": "Models take turns", "max_tokens": 4, "temperature": 0}
    with stack.client() as c, _worker(stack, "lru-a,lru-b", "--memory-budget", budget) as proc:
        for model in ("lru-a", "lru-b", "lru-a"):
            resp = c.post("/v1/completions", json={"model": model, **body})
            assert resp.status_code == 200, resp.text

        def reported() -> bool:
            return (_metric(c, "genq_worker_model_loads_total", "lru-a") == 2
                    and _metric(c, "genq_worker_model_evictions_total", "lru-a") == 1
                    and _metric(c, "genq_worker_model_evictions_total", "lru-b") == 1)

        wait_for(reported, 30, 0.5, "loads and evictions in /metrics")
        assert _metric(c, "genq_worker_model_resident", "lru-a") == 1
        assert _metric(c, "genq_worker_model_resident", "lru-b") == 0
        assert _metric(c, "genq_worker_model_load_seconds_total", "lru-a") > 0
        assert 0 < _metric(c, "genq_worker_model_bytes", "lru-a") <= int(budget)
        log = next(stack.logdir.glob("worker-lru-a+lru-b-*.log")).read_text()
        assert "evicted model lru-a" in log and "evicted model lru-b" in log
        assert proc.poll() is None


def test_an_image_adapter_runs_through_the_worker(stack: Stack, tiny_registry: Path, tmp_path: Path) -> None:
    from genq.client import archive_adapter
    from genq.workers.tiny_lora import build_image_lora

    lora = build_image_lora(tiny_registry.parent / "tiny-sd", tmp_path / "lora", seed=3)
    name = f"look-{uuid.uuid4().hex[:6]}"
    body = {"model": "tiny-sd", "prompt": "a red square", "size": "64x64", "num_inference_steps": 4,
            "seed": 5, "response_format": "b64_json"}
    with stack.client() as c:
        resp = c.post("/v1/adapters", data={"name": name, "model": "tiny-sd"},
                      files={"file": ("lora.zip", archive_adapter(lora, "zip"), "application/zip")})
        assert resp.status_code == 200, resp.text
        batch_id = _submit(c, [{"custom_id": "plain", "url": "/v1/images/generations", "body": body},
                               {"custom_id": "styled", "url": "/v1/images/generations",
                                "body": {**body, "adapter": name}}])
        assert _wait_done(c, batch_id)["request_counts"]["completed"] == 2
        results = _results(c, batch_id)
        alone = c.post("/v1/images/generations", json=body)
        assert alone.status_code == 200, alone.text
    plain, styled = (results[k]["response"]["body"]["data"][0] for k in ("plain", "styled"))
    assert plain["seed"] == styled["seed"] == 5
    assert plain["b64_json"] != styled["b64_json"]  # the adapter changed the image
    assert alone.json()["data"][0]["b64_json"] == plain["b64_json"]  # and left the plain request alone
