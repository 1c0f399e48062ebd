"""Fine-tuned models by name, against an in-process genq (SQLite, file storage, the in-memory broker,
no worker): a request naming one is stored as its base model's with its adapter and published on the
base model's queue; what the job answers names the fine-tuned model; /v1/models lists, reads and
deletes the tenant's own, through the unchanged `openai` package. The fine-tuned model is registered
as the training worker registers it (tests/support/fine_tuned.py), with a real peft adapter."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types import Model, ModelDeleted

from genq.services.auth import create_key
from genq.shared import jobs as job_state
from genq.shared.adapters import storage_key
from genq.shared.broker import queue_name
from genq.shared.db import Adapter, Job, session_scope
from genq.shared.finalize import maybe_finalize_batch
from genq.shared.webhooks import enqueue_job_event
from tests.support.app import api_client
from tests.support.fine_tuned import FILES, register_fine_tuned
from tests.support.queues import take_all

BASE = "tiny-chat"
MESSAGES = [{"role": "user", "content": "Where is the station?"}]


@pytest.fixture(scope="module")
def lora(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft LoRA of the tiny chat model, as a finished fine-tuning job leaves one."""
    from genq.workers.tiny_lora import build_text_lora

    return build_text_lora(tiny_dir / BASE, tmp_path_factory.mktemp("ft") / "lora", seed=3)


def _state(api: TestClient) -> Any:
    return api.app.state.genq  # type: ignore[attr-defined]


def _register(api: TestClient, lora: Path, tenant: str | None = None, base: str = BASE) -> Adapter:
    state = _state(api)
    with state.sessions() as session:
        return register_fine_tuned(session, state.storage, tenant=tenant, base=base, adapter_dir=lora)


def _queued(api: TestClient, model: str) -> list[str]:
    """The job ids waiting on a model's queue of the in-memory broker (taken off it)."""
    return [args[0] for _, args in take_all(_state(api).publisher.app, queue_name(model))]


def _job(api: TestClient, job_id: str) -> Job:
    with _state(api).sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _sdk(api: TestClient, key: str = "sk-local") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def _client(tmp_path: Path, tiny_dir: Path, **settings: Any) -> TestClient:
    """The API with the tiny models' registry (chat requests are checked against tiny-chat's template)."""
    return api_client(tmp_path, models_file=str(tiny_dir / "models.toml"), **settings)


@pytest.fixture()
def api(tmp_path: Path, tiny_dir: Path) -> Iterator[TestClient]:
    with _client(tmp_path, tiny_dir) as c:
        _queued(c, BASE)  # the in-memory broker is the process's: drop what earlier tests sent
        yield c


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, **extra}


def _assert_runs_on_base(job: Job, ft: Adapter) -> None:
    assert (job.model, job.requested_model) == (BASE, ft.name)
    assert job.body["model"] == BASE and job.body["adapter"] == ft.id


# --- routing ---------------------------------------------------------------------------------------

def test_a_job_naming_a_fine_tuned_model_runs_on_its_base_with_its_adapter(api: TestClient, lora: Path) -> None:
    ft = _register(api, lora)
    resp = api.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": _chat(ft.name)})
    assert resp.status_code == 202, resp.text
    assert resp.json()["model"] == ft.name
    job = _job(api, resp.json()["id"])
    _assert_runs_on_base(job, ft)
    assert _queued(api, BASE) == [job.id]  # published where the base model's workers read

    # The same request naming the base model and the adapter stores the same body.
    same = api.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": _chat(BASE, adapter=ft.id)}).json()
    assert _job(api, same["id"]).body == job.body and same["model"] == BASE


def test_batch_lines_and_file_batches_name_fine_tuned_models(api: TestClient, lora: Path) -> None:
    ft = _register(api, lora)
    lines = [{"custom_id": f"r{i}", "url": "/v1/chat/completions", "body": _chat(ft.name if i % 2 else BASE)}
             for i in range(4)]
    inline = api.post("/v1/batches", json={"requests": lines})
    assert inline.status_code == 202, inline.text
    upload = api.post("/v1/files", data={"purpose": "batch"},
                      files={"file": ("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())})
    from_file = api.post("/v1/batches", json={"input_file_id": upload.json()["id"],
                                              "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert from_file.status_code == 202, from_file.text
    for batch in (inline.json(), from_file.json()):  # the file batch was validated in the background
        jobs = api.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 10}).json()["data"]
        by_cid = {j["custom_id"]: j for j in jobs}
        assert [by_cid[f"r{i}"]["model"] for i in range(4)] == [BASE, ft.name, BASE, ft.name]
        for i in range(4):
            stored = _job(api, by_cid[f"r{i}"]["id"])
            if i % 2:
                _assert_runs_on_base(stored, ft)
            else:
                assert (stored.model, stored.requested_model, stored.body.get("adapter")) == (BASE, None, None)
    assert len(_queued(api, BASE)) == 8


def test_the_synchronous_route_and_the_sdk_queue_it_on_the_base_model(api: TestClient, lora: Path) -> None:
    ft = _register(api, lora)
    client = _sdk(api)
    with pytest.raises(openai.APIStatusError) as info:  # no worker here: the wait ends, naming the base's queue
        client.chat.completions.create(model=ft.name, messages=MESSAGES, max_tokens=4,  # type: ignore[arg-type]
                                       extra_query={"start_timeout": 0.2})
    assert info.value.status_code == 503 and f"queue genq.{BASE}" in info.value.message
    job = _job(api, info.value.body["message"].split("The job ")[1].split()[0])  # type: ignore[index]
    _assert_runs_on_base(job, ft)
    assert job.body["messages"] == MESSAGES


def test_refusals_name_the_field(api: TestClient, lora: Path) -> None:
    ft = _register(api, lora)
    both = api.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": _chat(ft.name, adapter=ft.id)})
    assert both.status_code == 400 and both.json()["error"]["param"] == "body.adapter", both.text
    assert "fine-tuned model" in both.json()["error"]["message"]
    for unknown in (ft.name + "x", "ft:tiny-chat:genq:ftjob-nope"):
        resp = api.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": _chat(unknown)})
        error = resp.json()["error"]
        assert resp.status_code == 400 and (error["code"], error["param"]) == ("model_not_found", "body.model")
        assert error["message"] == f"body.model: model {unknown!r} is not in the registry or among your " \
                                   "fine-tuned models"
    line = {"custom_id": "a", "url": "/v1/embeddings", "body": {"model": ft.name, "input": "x"}}
    wrong = api.post("/v1/batches", json={"requests": [line]}).json()["error"]
    assert wrong["param"] == "body.model" and wrong["line"] == 1
    assert wrong["message"] == f"line 1: body.model: model {ft.name!r} is a text model and cannot serve /v1/embeddings"
    assert _queued(api, BASE) == []


# --- answers name the fine-tuned model -----------------------------------------------------------

def _finish(api: TestClient, job: Job, text: str) -> None:
    """What a worker records: the runner's chat.completion, which names the base model it ran."""
    result = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": job.model,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    with session_scope(_state(api).sessions) as session:
        assert job_state.claim_job(session, job.id, worker="w", lease_s=60) is not None
    with session_scope(_state(api).sessions) as session:
        assert job_state.finish_job(session, job.id, worker="w", status="succeeded", result=result)


def test_results_and_streams_name_the_fine_tuned_model(api: TestClient, lora: Path) -> None:
    from genq.services.streaming import ChunkWriter

    ft = _register(api, lora)
    lines = [{"custom_id": "ft", "url": "/v1/chat/completions", "body": _chat(ft.name)},
             {"custom_id": "base", "url": "/v1/chat/completions", "body": _chat(BASE)}]
    batch = api.post("/v1/batches", json={"requests": lines}).json()
    jobs = {j["custom_id"]: _job(api, j["id"])
            for j in api.get(f"/v1/batches/{batch['id']}/jobs").json()["data"]}
    for cid, job in jobs.items():
        _finish(api, job, f"text of {cid}")
    assert _job(api, jobs["ft"].id).result["model"] == BASE  # type: ignore[index]  # stored as the worker wrote it

    shown = api.get(f"/v1/jobs/{jobs['ft'].id}").json()
    assert shown["model"] == ft.name and shown["result"]["model"] == ft.name
    assert api.get(f"/v1/jobs/{jobs['base'].id}").json()["result"]["model"] == BASE
    results = {x["custom_id"]: x for x in map(json.loads, api.get(f"/v1/batches/{batch['id']}/results").iter_lines())}
    assert results["ft"]["response"]["body"]["model"] == ft.name
    assert results["base"]["response"]["body"]["model"] == BASE

    state = _state(api)
    assert maybe_finalize_batch(state.sessions, state.storage, batch["id"]) == "completed"
    output = api.get(f"/v1/batches/{batch['id']}").json()["output_file_id"]
    stored = {x["custom_id"]: x for x in map(json.loads, api.get(f"/v1/files/{output}/content").iter_lines())}
    assert stored["ft"]["response"]["body"]["model"] == ft.name

    with state.sessions() as session:
        job = session.get(Job, jobs["ft"].id)
        job.webhook_url = "https://hooks.example/genq"  # type: ignore[union-attr]
        delivery = enqueue_job_event(session, job, "completed")  # type: ignore[arg-type]
    assert delivery is not None
    assert delivery.payload["data"]["model"] == ft.name and delivery.payload["data"]["result"]["model"] == ft.name
    writer = ChunkWriter(jobs["ft"], "fp", choices=1, include_usage=False)
    assert json.loads(writer.opening()[0])["model"] == ft.name


def test_a_retried_batch_looks_the_fine_tuned_model_up_again(api: TestClient, lora: Path) -> None:
    ft = _register(api, lora)
    batch = api.post("/v1/batches", json={"requests": [
        {"custom_id": "a", "url": "/v1/chat/completions", "body": _chat(ft.name)}]}).json()
    (job,) = api.get(f"/v1/batches/{batch['id']}/jobs").json()["data"]
    with session_scope(_state(api).sessions) as session:
        assert job_state.claim_job(session, job["id"], worker="w", lease_s=60) is not None
    with session_scope(_state(api).sessions) as session:
        assert job_state.finish_job(session, job["id"], worker="w", status="failed",
                                    error={"code": "runtime_error", "message": "boom"})
    retry = api.post(f"/v1/batches/{batch['id']}/retry")
    assert retry.status_code == 202, retry.text
    (again,) = api.get(f"/v1/batches/{retry.json()['id']}/jobs").json()["data"]
    _assert_runs_on_base(_job(api, again["id"]), ft)

    assert api.delete(f"/v1/models/{ft.name}").status_code == 200
    gone = api.post(f"/v1/batches/{batch['id']}/retry").json()["error"]
    assert (gone["code"], gone["param"], gone["line"]) == ("model_not_found", "body.model", 1)


# --- /v1/models ------------------------------------------------------------------------------------

def test_models_list_retrieve_and_delete_through_the_sdk(api: TestClient, lora: Path) -> None:
    client = _sdk(api)
    registry = [m.id for m in client.models.list()]
    ft = _register(api, lora)
    listed = list(client.models.list())
    assert [m.id for m in listed] == [*registry, ft.name]  # the registry's, then the tenant's
    mine = listed[-1]
    assert isinstance(mine, Model) and (mine.object, mine.owned_by, mine.created) == ("model", "default",
                                                                                       int(ft.created_at))
    assert (mine.model_extra or {})["queue"] == f"genq.{BASE}"
    assert client.models.retrieve(ft.name) == mine

    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.models.delete(BASE)
    assert refused.value.body["code"] == "permission_denied"  # type: ignore[index]
    deleted = client.models.delete(ft.name)
    assert isinstance(deleted, ModelDeleted) and deleted.model_dump() == {"id": ft.name, "object": "model",
                                                                          "deleted": True}
    assert not (set(deleted.model_extra or {}))
    state = _state(api)
    assert not any(state.storage.exists(storage_key(ft.id, f)) for f in FILES)
    with state.sessions() as session:
        assert session.get(Adapter, ft.id) is None
    assert [m.id for m in client.models.list()] == registry
    for call in (lambda: client.models.retrieve(ft.name), lambda: client.models.delete(ft.name)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    resp = api.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": _chat(ft.name)})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_found"


def test_deleting_the_adapter_deletes_the_model(api: TestClient, lora: Path) -> None:
    ft = _register(api, lora)
    adapter = api.get(f"/v1/adapters/{ft.id}").json()
    assert adapter["name"] == ft.name and adapter["model"] == BASE and adapter["rank"] == 4
    assert api.delete(f"/v1/adapters/{ft.id}").json() == {"id": ft.id, "object": "adapter", "deleted": True}
    assert api.get(f"/v1/models/{ft.name}").status_code == 404
    assert ft.name not in [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert not any(_state(api).storage.exists(storage_key(ft.id, f)) for f in FILES)


def _key(api: TestClient, tenant: str) -> str:
    with _state(api).sessions() as s:
        _, key = create_key(s, tenant=tenant)
        s.commit()
    return key


def test_fine_tuned_models_are_their_tenants_own(tmp_path: Path, tiny_dir: Path, lora: Path) -> None:
    with _client(tmp_path, tiny_dir, auth="required") as api:
        acme, other = _sdk(api, _key(api, "acme")), _sdk(api, _key(api, "other"))
        ft = _register(api, lora, tenant="acme")
        assert acme.models.list().data[-1].id == ft.name and acme.models.retrieve(ft.name).owned_by == "acme"
        assert ft.name not in [m.id for m in other.models.list()]
        for call in (lambda: other.models.retrieve(ft.name), lambda: other.models.delete(ft.name)):
            with pytest.raises(openai.NotFoundError):
                call()
        line = {"custom_id": "a", "url": "/v1/chat/completions", "body": _chat(ft.name)}
        upload = other.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
        batch = other.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        failed = other.batches.retrieve(batch.id)  # validated in the background, after the create answered
        assert failed.status == "failed" and failed.errors is not None and failed.errors.data
        assert (failed.errors.data[0].code, failed.errors.data[0].param) == ("model_not_found", "body.model")
        resp = api.post("/v1/jobs", headers={"Authorization": f"Bearer {other.api_key}"},
                        json={"url": "/v1/chat/completions", "body": _chat(ft.name)})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_found"
        mine = api.post("/v1/jobs", headers={"Authorization": f"Bearer {acme.api_key}"},
                        json={"url": "/v1/chat/completions", "body": _chat(ft.name)})
        assert mine.status_code == 202 and mine.json()["model"] == ft.name
        assert acme.models.delete(ft.name).deleted


def test_a_model_whose_base_left_the_registry_is_unlisted_but_deletable(api: TestClient, lora: Path) -> None:
    ft = _register(api, lora, base="retired-model")
    assert ft.name not in [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert api.get(f"/v1/models/{ft.name}").status_code == 404
    resp = api.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": _chat(ft.name)})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_found"
    assert "fine-tuned from 'retired-model', which is no longer in the registry" in resp.json()["error"]["message"]
    assert api.delete(f"/v1/models/{ft.name}").json() == {"id": ft.name, "object": "model", "deleted": True}
