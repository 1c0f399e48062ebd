"""The fine-tuning API through the official `openai` package, unchanged, against an in-process
genq (SQLite, file storage, the in-memory broker, no worker: jobs stay where the API leaves them,
and the worker's part, starting a job and saving checkpoints, is written to the database here)."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from pydantic import BaseModel
from sqlalchemy import update

from genq.services.auth import create_key
from genq.shared.broker import FINE_TUNE_TASK, train_queue_name
from genq.shared.db import File, FineTuningCheckpoint, session_scope
from genq.shared.db import FineTuningJob as JobRow
from genq.shared.fine_tuning_jobs import add_event, new_ft_id
from tests.support.app import api_client
from tests.support.queues import take_all

CHAT = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(5)]


def _jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[TestClient]:
    with api_client(tmp_path) as c:
        _published(c, "tiny-gpt2")  # the in-memory broker is the process's: drop what earlier tests sent
        yield c


def _sdk(api: TestClient, key: str = "sk-local") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


@pytest.fixture()
def client(api: TestClient) -> openai.OpenAI:
    return _sdk(api)


def exact(model: type[BaseModel], obj: Any) -> Any:
    """OpenAI's type of `obj`, checked both ways: it validates, and genq sends no key the type lacks."""
    data = obj.model_dump() if isinstance(obj, BaseModel) else obj
    extra = set(obj.model_extra or {}) if isinstance(obj, BaseModel) else set(data) - set(model.model_fields)
    assert extra == set(), f"keys {model.__name__} does not have: {extra}"
    return model.model_validate(data)


def _upload(client: openai.OpenAI, lines: list[Any]) -> str:
    return client.files.create(file=("train.jsonl", io.BytesIO(_jsonl(lines))), purpose="fine-tune").id


def _state(api: TestClient) -> Any:
    return api.app.state.genq  # type: ignore[attr-defined]


def _published(api: TestClient, model: str) -> list[tuple[str, list[Any]]]:
    """The tasks waiting on a model's training queue of the in-memory broker: (task name, args)."""
    return take_all(_state(api).publisher.app, train_queue_name(model))


def test_a_fine_tuning_script_runs_unchanged(api: TestClient, client: openai.OpenAI) -> None:
    training, validation = _upload(client, CHAT), _upload(client, CHAT[:2])
    assert client.files.retrieve(training).purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(
        model="tiny-gpt2", training_file=training, validation_file=validation, suffix="my-bot", seed=42,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        metadata={"team": "search"}, extra_body={"lora": {"r": 4, "target_modules": ["c_attn"]}})
    exact(FineTuningJob, job)
    assert job.id.startswith("ftjob-") and job.status == "queued" and job.model == "tiny-gpt2"
    assert job.training_file == training and job.validation_file == validation and job.seed == 42
    assert job.hyperparameters.model_dump() == {"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 2
    assert job.fine_tuned_model is None and job.finished_at is None and job.metadata == {"team": "search"}
    assert _published(api, "tiny-gpt2") == [(FINE_TUNE_TASK, [job.id])]
    assert set(api.get(f"/v1/fine_tuning/jobs/{job.id}").json()) == set(FineTuningJob.model_fields)  # every field

    assert exact(FineTuningJob, client.fine_tuning.jobs.retrieve(job.id)).id == job.id
    listed = client.fine_tuning.jobs.list(limit=5)
    assert [exact(FineTuningJob, j).id for j in listed.data] == [job.id]

    events = client.fine_tuning.jobs.list_events(job.id).data
    assert [exact(FineTuningJobEvent, e).message for e in events] == [
        "Files validated, moving job to queued state", f"Validating validation file: {validation}",
        f"Validating training file: {training}", f"Created fine-tuning job: {job.id}"]
    assert all(e.id.startswith("ftevent-") and e.level == "info" and e.type == "message" for e in events)
    assert events[0].data == {"training_examples": 5, "hyperparameters": job.hyperparameters.model_dump(),
                              "lora": {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["c_attn"]}}
    with session_scope(_state(api).sessions) as s:
        assert s.get(JobRow, job.id).fine_tuned_model == f"ft:tiny-gpt2:my-bot:{job.id}"

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert exact(FineTuningJob, cancelled).status == "cancelled" and cancelled.finished_at is not None
    assert client.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message == "Fine-tuning job cancelled"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # again: unchanged
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []


def test_a_malformed_training_file_is_refused_naming_the_line(api: TestClient, client: openai.OpenAI) -> None:
    bad = [CHAT[0], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}]
    with pytest.raises(openai.BadRequestError) as info:
        _upload(client, bad)
    error = info.value.body
    assert error["param"] == "file" and error["line"] == 2
    assert error["message"].startswith("file: line 2: messages[1].content: must be a string: content parts")
    assert client.files.list().data == []

    # A file stored before genq checked uploads (or one over a limit since lowered) is refused at create.
    state = _state(api)
    mixed = _jsonl([CHAT[0], {"prompt": "a", "completion": "b"}])
    state.storage.put("files/file_old.jsonl", mixed, "application/jsonl")
    with session_scope(state.sessions) as s:
        s.add(File(id="file_old", tenant=None, purpose="fine-tune", filename="old.jsonl", bytes=1,
                   key="files/file_old.jsonl", created_at=time.time()))
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="tiny-gpt2", training_file="file_old")
    error = info.value.body
    assert error["param"] == "training_file" and error["line"] == 2 and "line 2: is in prompt-completion" in error[
        "message"]
    assert [e["line"] for e in error["errors"]] == [2]
    assert client.fine_tuning.jobs.list().data == [] and _published(api, "tiny-gpt2") == []


@pytest.mark.parametrize("body, param, words", [
    ({"model": "no-such-model"}, "model", "not in the registry"),
    ({"model": "tiny-sd"}, "model", "is a image model; genq fine-tunes text models"),
    ({"training_file": "file_missing"}, "training_file", "no file with id 'file_missing'"),
    ({"validation_file": "file_missing"}, "validation_file", "no file with id"),
    ({"method": {"type": "reinforcement"}}, "method.type", "only supervised"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", "not supported"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised"}}, "method", "not both"),
    ({"lora": {"r": 1000}}, "lora.r", "less than or equal to 256"),
    ({"suffix": "has space"}, "suffix", "a-z, 0-9"),
    ({"epochs": 3}, "epochs", "unknown field"),
])
def test_bad_create_requests_name_the_field(api: TestClient, client: openai.OpenAI, body: dict[str, Any],
                                            param: str, words: str) -> None:
    training = _upload(client, CHAT)
    resp = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": training, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert client.fine_tuning.jobs.list().data == []


def test_a_batch_file_is_not_training_data(client: openai.OpenAI) -> None:
    batch = client.files.create(file=("b.jsonl", io.BytesIO(b'{"custom_id": "a"}\n')), purpose="batch").id
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=batch)
    assert info.value.body["param"] == "training_file" and "purpose 'batch'" in info.value.body["message"]


def _start(api: TestClient, job_id: str) -> None:
    """What a training worker does when it takes a job."""
    with session_scope(_state(api).sessions) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(status="running", started_at=time.time()))


def test_a_running_job_is_asked_to_stop_and_stays_running(api: TestClient, client: openai.OpenAI) -> None:
    job = client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=_upload(client, CHAT))
    _start(api, job.id)
    answer = client.fine_tuning.jobs.cancel(job.id)
    assert answer.status == "running" and answer.finished_at is None
    with session_scope(_state(api).sessions) as s:
        assert s.get(JobRow, job.id).cancel_requested_at is not None
    assert client.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message.startswith("Cancellation requested")
    client.fine_tuning.jobs.cancel(job.id)  # asked twice: one event
    assert sum("Cancellation" in e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50)) == 1


def test_events_and_checkpoints_page_newest_first(api: TestClient, client: openai.OpenAI) -> None:
    job = client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=_upload(client, CHAT), suffix="v1")
    _start(api, job.id)
    with session_scope(_state(api).sessions) as s:
        for step in range(1, 6):
            add_event(s, job.id, f"Step {step}/5: training loss={1 / step:.2f}", kind="metrics",
                      data={"step": step, "train_loss": 1 / step})
        for step in (2, 4):
            s.add(FineTuningCheckpoint(id=new_ft_id("ftckpt"), job_id=job.id, created_at=time.time(), step=step,
                                       metrics={"step": step, "train_loss": 1 / step, "worker_rss": 1.0},
                                       key_prefix=f"fine_tuning/{job.id}/step-{step}/"))
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.data["step"] for e in first.data] == [5, 4] and first.has_more and first.data[0].type == "metrics"
    second = first.get_next_page()
    assert [e.data["step"] for e in second.data] == [3, 2]
    everything = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]  # auto-paging
    assert len(everything) == 8 and everything[-1] == f"Created fine-tuning job: {job.id}"

    page = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    checkpoint = exact(FineTuningJobCheckpoint, page.data[0])
    assert checkpoint.id.startswith("ftckpt-") and checkpoint.step_number == 4 and page.has_more
    assert checkpoint.fine_tuned_model_checkpoint == f"ft:tiny-gpt2:v1:{job.id}:ckpt-step-4"
    assert checkpoint.fine_tuning_job_id == job.id and checkpoint.metrics.train_loss == 0.25
    assert checkpoint.metrics.step == 4 and "worker_rss" not in page.data[0].metrics.model_dump()
    assert [c.step_number for c in page.get_next_page().data] == [2]
    raw_event = api.get(f"/v1/fine_tuning/jobs/{job.id}/events").json()["data"][0]
    raw_checkpoint = api.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"][0]
    assert set(raw_event) == set(FineTuningJobEvent.model_fields)
    assert set(raw_checkpoint) == set(FineTuningJobCheckpoint.model_fields)
    resp = api.get(f"/v1/fine_tuning/jobs/{job.id}/events", params={"after": "ftevent-nope"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "after"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_jobs_list_newest_first_with_a_metadata_filter(backend: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """The metadata filter reads inside a JSON column, which each database spells its own way."""
    database = {"database_url": request.getfixturevalue("pg_url")} if backend == "postgres" else {}
    with api_client(tmp_path, **database) as api:
        _jobs_list_newest_first_with_a_metadata_filter(_sdk(api))


def _jobs_list_newest_first_with_a_metadata_filter(client: openai.OpenAI) -> None:
    training, run = _upload(client, CHAT), uuid.uuid4().hex  # the Postgres database is the session's
    made = [client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=training,
                                           metadata={"run": run, "team": team}).id for team in ("a", "b", "a")]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": run})] == made[::-1]
    page = client.fine_tuning.jobs.list(limit=2, metadata={"run": run})
    assert [j.id for j in page.data] == made[:0:-1] and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": run, "team": "a"})] == [made[2], made[0]]
    assert list(client.fine_tuning.jobs.list(metadata={"run": run, "team": "c"})) == []
    assert client.fine_tuning.jobs.list(limit=100).data[0].id == made[-1]
    odd = {'say "hi"': "v", "back\\slash": "v", "über": "ü", "a.b": "v"}  # keys a JSON path would have to escape
    odd_job = client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=training, metadata={"run": run, **odd})
    for key, value in odd.items():
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": run, key: value})] == [odd_job.id]


def _key(api: TestClient, tenant: str) -> str:
    with _state(api).sessions() as s:
        _, key = create_key(s, tenant=tenant)
        s.commit()
    return key


def test_another_tenants_job_and_files_are_not_found(tmp_path: Path) -> None:
    with api_client(tmp_path, auth="required") as api:
        acme, other = _sdk(api, _key(api, "acme")), _sdk(api, _key(api, "other"))
        training = _upload(acme, CHAT)
        job = acme.fine_tuning.jobs.create(model="tiny-gpt2", training_file=training)
        assert exact(FineTuningJob, job).organization_id == "acme"
        for call in (lambda: other.fine_tuning.jobs.retrieve(job.id), lambda: other.fine_tuning.jobs.cancel(job.id),
                     lambda: other.fine_tuning.jobs.list_events(job.id),
                     lambda: other.fine_tuning.jobs.checkpoints.list(job.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert list(other.fine_tuning.jobs.list()) == []
        with pytest.raises(openai.BadRequestError) as info:
            other.fine_tuning.jobs.create(model="tiny-gpt2", training_file=training)
        assert info.value.body["param"] == "training_file" and "no file with id" in info.value.body["message"]
        assert acme.fine_tuning.jobs.retrieve(job.id).status == "queued"


def test_the_openapi_document_describes_the_fine_tuning_routes(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if p.startswith("/v1/fine_tuning")}
    assert ops == {("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs"),
                   ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"),
                   ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
                   ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"),
                   ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints")}
    body = doc["paths"]["/v1/fine_tuning/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "training_file", "method", "lora"} <= set(body["properties"])
    assert body["required"] == ["model", "training_file"]


def test_a_repeated_create_with_an_idempotency_key_is_one_job(api: TestClient, client: openai.OpenAI) -> None:
    training = _upload(client, CHAT)
    body, headers = {"model": "tiny-gpt2", "training_file": training}, {"Idempotency-Key": "ft-once"}
    first = api.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    again = api.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    assert _published(api, "tiny-gpt2") == [(FINE_TUNE_TASK, [first.json()["id"]])]
    other = api.post("/v1/fine_tuning/jobs", json={**body, "seed": 1}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_broker_outage_leaves_the_job_recorded_and_queued(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with api_client(tmp_path, broker_url="redis://127.0.0.1:1/0", limits={"rate_limit_per_minute": 0}) as api:
        client = _sdk(api)
        job = client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=_upload(client, CHAT))
        assert job.status == "queued" and client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    assert f"could not publish fine-tuning job {job.id}" in caplog.text
