"""Fine-tuning jobs run by real workers (Postgres, Redis, S3, the tiny chat model), driven through
the `openai` package: a job trains to `succeeded` and registers its adapter; a worker SIGKILLed
mid-training hands the job, through its lease, to another worker, which resumes from the last
checkpoint; a cancel stops a running job and keeps its checkpoints."""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from genq.sse import iter_events
from tests.integration.test_webhooks import Receiver
from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration
MODEL = "ft-chat"  # the tiny chat model under a name only these tests' workers serve


def chat_lines(n: int) -> bytes:
    """n short chat examples (the answers follow a rule the adapter can learn)."""
    rows = [{"messages": [{"role": "user", "content": f"Count from {i}"},
                          {"role": "assistant", "content": " ".join(str(i + k) for k in range(4))}]}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture()
def stack(stack_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """An API of its own; each test starts its workers (a fresh lease of 3 s, so recovery is quick)."""
    s = Stack({**stack_env, "GENQ_WORKER_LEASE_S": "3"}, tmp_path)
    try:
        s.start_api()
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.stop()


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-local", max_retries=0, timeout=60)


def _worker(stack: Stack, name: str, *extra: str) -> Any:
    proc = stack.start_worker(MODEL, "--work", "training", *extra, name=name)
    stack.wait_worker_ready(proc, name)
    return proc


def _create(client: openai.OpenAI, examples: int, extra: dict[str, Any] | None = None, **hyper: Any) -> Any:
    training = client.files.create(file=("train.jsonl", io.BytesIO(chat_lines(examples))), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=MODEL, training_file=training.id, seed=7, suffix="count",
                                          hyperparameters=hyper, extra_body={"lora": {"r": 4}, **(extra or {})})


def _status(client: openai.OpenAI, job_id: str, *wanted: str) -> Any:
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status not in {"failed", "cancelled", "succeeded"} - set(wanted), job
    return job if job.status in wanted else None


def _messages(client: openai.OpenAI, job_id: str) -> list[Any]:
    return list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=100).data))  # oldest first


def test_a_job_trains_to_succeeded_and_registers_its_adapter(stack: Stack) -> None:
    client = _client(stack)
    _worker(stack, "trainer", "--checkpoint-every", "4")
    secret = client.get("/webhooks/secret", cast_to=object)["secret"]  # type: ignore[index]
    with Receiver(secret) as hooks:
        job = _create(client, 12, {"webhook_url": hooks.url, "webhook_events": ["succeeded", "progress"]},
                      n_epochs=2, batch_size=4)  # 3 steps an epoch, 6 in all
        _follow_and_check(stack, client, job)
        got = wait_for(lambda: list(hooks.requests) if len(hooks.requests) >= 3 else None, 60, 0.1,
                       "the job's webhooks")
    assert len(got) == 3 and all(r["valid"] for r in got)  # signed with the tenant's secret
    progress = [r["event"]["data"] for r in got if r["event"]["type"] == "fine_tuning.job.progress"]
    assert sorted(p["metrics"]["step"] for p in progress) == [4, 6]  # one at each checkpoint
    assert all(p["metrics"]["train_loss"] > 0 for p in progress)
    (final,) = [r["event"]["data"] for r in got if r["event"]["type"] == "fine_tuning.job.succeeded"]
    assert final["id"] == job.id and final["status"] == "succeeded" and final["fine_tuned_model"]


def _follow_and_check(stack: Stack, client: openai.OpenAI, job: Any) -> None:
    """Follow a job's events live to its end, then check the job, its events and checkpoints."""
    # Followed live: every event as it is written, then the ended job.
    with httpx.stream("GET", f"{stack.base_url}/v1/fine_tuning/jobs/{job.id}/events", params={"stream": "true"},
                      timeout=180) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        streamed = list(iter_events(resp.iter_bytes()))
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == f"ft:{MODEL}:count:{job.id}" and done.trained_tokens > 0
    assert done.finished_at >= done.created_at
    events = _messages(client, job.id)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and metrics[-1].data["step"] == 6 and metrics[-1].data["train_loss"] > 0
    assert events[-1].message == "The job has successfully completed"
    assert [e.event for e in streamed] == ["fine_tuning.job.event"] * len(events) + ["fine_tuning.job", "done"]
    assert [json.loads(e.data)["id"] for e in streamed[:-2]] == [e.id for e in events]
    assert json.loads(streamed[-2].data)["status"] == "succeeded"
    # A reconnect with Last-Event-ID gets only what came after that event.
    with httpx.stream("GET", f"{stack.base_url}/v1/fine_tuning/jobs/{job.id}/events", params={"stream": "true"},
                      headers={"Last-Event-ID": streamed[-4].id or ""}, timeout=60) as resp:
        again = list(iter_events(resp.iter_bytes()))
    assert [e.event for e in again] == ["fine_tuning.job.event", "fine_tuning.job", "done"]
    assert json.loads(again[0].data)["id"] == events[-1].id
    steps = sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert steps == [4, 6]  # every 4 steps, and the last
    adapters = client.get("/adapters", cast_to=object)
    ours = [a for a in adapters["data"] if a["name"] == done.fine_tuned_model]  # type: ignore[index]
    assert len(ours) == 1 and ours[0]["model"] == MODEL and ours[0]["rank"] == 4


def test_a_killed_worker_s_job_resumes_from_its_last_checkpoint_on_another(stack: Stack) -> None:
    client = _client(stack)
    first = _worker(stack, "trainer-a", "--checkpoint-every", "10")
    job = _create(client, 200, n_epochs=2, batch_size=1)  # 400 steps: long enough to kill mid-run

    def checkpointed() -> int | None:
        _status(client, job.id, "running")
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
        return max(steps) if steps else None

    wait_for(checkpointed, 120, 0.05, "a first checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    saved = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert saved < 400, "the job ended before the worker was killed"
    _worker(stack, "trainer-b", "--checkpoint-every", "200")
    done = wait_for(lambda: _status(client, job.id, "succeeded"), 300, 0.2, "job succeeded after a resume")
    events = _messages(client, job.id)
    resumed = [e.message for e in events if e.message.startswith("Fine-tuning job resumed from step")]
    assert resumed == [f"Fine-tuning job resumed from step {saved} on {resumed[0].split(' on ', 1)[1]}"]
    assert any("queued again" in e.message for e in events)
    # Steps after the checkpoint were trained again by the second worker, none before it.
    after = [e for e in events[events.index(next(e for e in events if e.message in resumed)):] if e.type == "metrics"]
    assert after and min(e.data["step"] for e in after) > saved
    assert done.trained_tokens > 0
    names = [a["name"] for a in client.get("/adapters", cast_to=object)["data"]]  # type: ignore[index]
    assert names.count(done.fine_tuned_model) == 1  # no duplicated adapter


def test_cancel_stops_a_running_job_and_keeps_its_checkpoints(stack: Stack) -> None:
    client = _client(stack)
    _worker(stack, "trainer", "--checkpoint-every", "5")
    job = _create(client, 400, n_epochs=3, batch_size=1)

    def has_checkpoint() -> bool | None:
        _status(client, job.id, "running")
        return bool(client.fine_tuning.jobs.checkpoints.list(job.id).data) or None

    wait_for(has_checkpoint, 120, 0.05, "a checkpoint")
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_for(lambda: _status(client, job.id, "cancelled"), 60, 0.1, "job cancelled")
    assert done.fine_tuned_model is None
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert any(e.message.startswith("Fine-tuning job cancelled at step") for e in _messages(client, job.id))


def test_the_trained_model_answers_by_its_name(stack: Stack) -> None:
    """What a job trained is a model of its tenant's: a worker serving the base model answers a chat
    completion naming it with the trained adapter, and says its name."""
    client = _client(stack)
    _worker(stack, "trainer-and-server", "--work", "both")
    job = _create(client, 8, n_epochs=1, batch_size=4)
    done = wait_for(lambda: _status(client, job.id, "succeeded"), 180, 0.2, "job succeeded")
    listed = {m.id: m for m in client.models.list()}
    assert listed[done.fine_tuned_model].owned_by == done.organization_id
    adapter = next(a for a in client.get("/adapters", cast_to=object)["data"]  # type: ignore[index]
                   if a["name"] == done.fine_tuned_model)
    ask: dict[str, Any] = {"messages": [{"role": "user", "content": "Count from 3"}], "max_tokens": 8,
                           "temperature": 0}
    tuned = client.chat.completions.create(model=done.fine_tuned_model, **ask)
    same = client.chat.completions.create(model=MODEL, extra_body={"adapter": adapter["id"]}, **ask)
    assert tuned.model == done.fine_tuned_model and same.model == MODEL
    assert tuned.choices[0].message.content == same.choices[0].message.content
