"""LoRA adapters through the API: upload (a checked archive into S3), list, read, delete, tenant
isolation, and naming adapters in jobs, batches and file batches. An API process of our own with
GENQ_AUTH=required runs against the shared Postgres, Redis and S3 endpoint; its adapter models are
served by no worker, so accepted jobs stay queued and their stored bodies can be read."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from genq.client import archive_adapter
from genq.workers.tiny_lora import build_image_lora, build_text_lora
from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

TEXT, TEXT_B, IMAGE = "adapters-text", "adapters-text-b", "adapters-image"  # no worker serves these
REGISTRY_LORA = "reg-text-lora"
MAX_ADAPTER_BYTES = 300_000


@pytest.fixture(scope="module")
def loras(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("loras")
    base = tiny_registry.parent
    return {"text": build_text_lora(base / "tiny-gpt2", out / "text", seed=1),
            "registry": build_text_lora(base / "tiny-gpt2", out / "registry", seed=2),
            "image": build_image_lora(base / "tiny-sd", out / "image", seed=1)}


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str], tiny_registry: Path, loras: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tiny_registry.parent
    registry = base / "models-adapters.toml"
    registry.write_text(tiny_registry.read_text() + f"""
[models.{TEXT}]
kind = "text"
source = "{base / 'tiny-gpt2'}"

[models.{TEXT_B}]
kind = "text"
source = "{base / 'tiny-gpt2'}"

[models.{IMAGE}]
kind = "image"
source = "{base / 'tiny-sd'}"
max_size = 256

[adapters.{REGISTRY_LORA}]
model = "{TEXT}"
source = "{loras['registry']}"
""")
    env = {**stack_env, "GENQ_AUTH": "required", "GENQ_MODELS_FILE": str(registry),
           "GENQ_MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES)}
    stack = Stack(env, tmp_path_factory.mktemp("adapters-api"))
    try:
        stack.start_api()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def clients(api: Stack, pg_url: str) -> Iterator[dict[str, httpx.Client]]:
    """Clients for two tenants, with keys made as `genq keys create` makes them."""
    from genq.services.auth import create_key
    from genq.shared.db import session_factory

    tag = uuid.uuid4().hex[:6]
    out: dict[str, httpx.Client] = {}
    with session_factory(pg_url)() as session:
        for who in ("a", "b"):
            _, key = create_key(session, tenant=f"{who}-{tag}")
            session.commit()
            out[who] = httpx.Client(base_url=api.base_url, timeout=60, headers={"Authorization": f"Bearer {key}"})
    yield out
    for c in out.values():
        c.close()


@pytest.fixture()
def storage(settings_for: Callable[..., Any]) -> Any:
    from genq.shared.storage import storage_from_settings

    return storage_from_settings(settings_for())


def _upload(c: httpx.Client, name: str, model: str, data: bytes, filename: str = "lora.tar.gz") -> httpx.Response:
    return c.post("/v1/adapters", data={"name": name, "model": model},
                  files={"file": (filename, data, "application/octet-stream")})


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _error(resp: httpx.Response, status: int, param: str | None, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"type", "code", "message", "param"} and err["param"] == param, err
    for word in words:
        assert word in err["message"], err["message"]
    return dict(err)


def _text_line(adapter: str, model: str = TEXT, custom_id: str = "q") -> dict[str, Any]:
    return {"custom_id": custom_id, "url": "/v1/completions",
            "body": {"model": model, "prompt": "The queue", "max_tokens": 4, "adapter": adapter}}


def _stored_bodies(pg_url: str, job_ids: list[str]) -> list[dict[str, Any]]:
    from genq.shared.db import Job, session_factory

    with session_factory(pg_url)() as session:
        return [session.get(Job, j).body for j in job_ids]  # type: ignore[union-attr]


# --- upload, list, read, delete ------------------------------------------------------------------

def test_upload_list_get_delete(clients: dict[str, httpx.Client], loras: dict[str, Path], storage: Any) -> None:
    a, b = clients["a"], clients["b"]
    name = _name("style")
    resp = _upload(a, name, TEXT, archive_adapter(loras["text"], "tar.gz"))
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    weights = (loras["text"] / "adapter_model.safetensors").read_bytes()
    config = (loras["text"] / "adapter_config.json").read_bytes()
    assert obj["id"].startswith("adapter_") and obj["object"] == "adapter"
    assert (obj["name"], obj["model"], obj["owned_by"]) == (name, TEXT, "user")
    assert obj["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert (obj["rank"], obj["lora_alpha"], obj["target_modules"]) == (4, 8, ["c_attn", "c_fc", "c_proj"])
    assert obj["bytes"] == len(weights) + len(config) and isinstance(obj["created_at"], int)
    assert storage.get(f"adapters/{obj['id']}/adapter_model.safetensors") == weights
    assert storage.get(f"adapters/{obj['id']}/adapter_config.json") == config

    listed = a.get("/v1/adapters").json()
    assert listed["object"] == "list"
    by_id = {x["id"]: x for x in listed["data"]}
    assert by_id[obj["id"]] == obj
    assert by_id[REGISTRY_LORA]["owned_by"] == "registry" and by_id[REGISTRY_LORA]["model"] == TEXT
    assert by_id[REGISTRY_LORA]["rank"] == 4
    assert a.get("/v1/adapters", params={"model": IMAGE}).json()["data"] == []
    assert a.get(f"/v1/adapters/{obj['id']}").json() == obj
    assert a.get(f"/v1/adapters/{REGISTRY_LORA}").json()["name"] == REGISTRY_LORA

    # Another tenant sees only the registry's adapters, and a's adapter is 404 to it, never 403.
    assert [x["id"] for x in b.get("/v1/adapters").json()["data"]] == [REGISTRY_LORA]
    _error(b.get(f"/v1/adapters/{obj['id']}"), 404, "id", obj["id"])
    _error(b.delete(f"/v1/adapters/{obj['id']}"), 404, "id")

    _error(a.delete(f"/v1/adapters/{REGISTRY_LORA}"), 400, "id", "model registry", "cannot be deleted")
    assert a.delete(f"/v1/adapters/{obj['id']}").json() == {"id": obj["id"], "object": "adapter", "deleted": True}
    _error(a.get(f"/v1/adapters/{obj['id']}"), 404, "id")
    assert not storage.exists(f"adapters/{obj['id']}/adapter_model.safetensors")
    assert not storage.exists(f"adapters/{obj['id']}/adapter_config.json")


def test_an_upload_with_an_idempotency_key_is_made_once(clients: dict[str, httpx.Client],
                                                       loras: dict[str, Path]) -> None:
    a, name, archive = clients["a"], _name("once"), archive_adapter(loras["text"], "tar.gz")
    key = {"Idempotency-Key": f"upload-{name}"}
    files = {"file": ("lora.tar.gz", archive, "application/octet-stream")}
    first = a.post("/v1/adapters", data={"name": name, "model": TEXT}, files=files, headers=key)
    again = a.post("/v1/adapters", data={"name": name, "model": TEXT}, files=files, headers=key)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json()
    other = a.post("/v1/adapters", data={"name": name + "x", "model": TEXT}, files=files, headers=key)
    _error(other, 409, "Idempotency-Key", "already used with a different request")
    assert [d["id"] for d in a.get("/v1/adapters").json()["data"] if d["name"] == name] == [first.json()["id"]]
    assert a.delete(f"/v1/adapters/{first.json()['id']}").status_code == 200


def test_image_adapter_from_a_zip(clients: dict[str, httpx.Client], loras: dict[str, Path], storage: Any) -> None:
    resp = _upload(clients["a"], _name("sd"), IMAGE, archive_adapter(loras["image"], "zip"), "lora.zip")
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    assert obj["files"] == ["pytorch_lora_weights.safetensors"] and obj["rank"] == 4
    assert storage.get(f"adapters/{obj['id']}/pytorch_lora_weights.safetensors") == \
        (loras["image"] / "pytorch_lora_weights.safetensors").read_bytes()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_bad_archives_are_400_naming_the_member(clients: dict[str, httpx.Client], loras: dict[str, Path]) -> None:
    a = clients["a"]
    config = (loras["text"] / "adapter_config.json").read_bytes()
    weights = (loras["text"] / "adapter_model.safetensors").read_bytes()
    pickled = _tar({"adapter_config.json": config, "adapter_model.bin": b"\x80\x04\x95pickle"})
    err = _error(_upload(a, _name("p"), TEXT, pickled), 400, "file", "adapter_model.bin", "pickle-based weights",
                 "safetensors")
    assert err["code"] == "invalid_adapter" and err["type"] == "invalid_request_error"
    _error(_upload(a, _name("x"), TEXT, b"definitely not an archive"), 400, "file", "not a zip, tar or tar.gz")
    _error(_upload(a, _name("x"), TEXT, _tar({"adapter_config.json": config,
                                              "adapter_model.safetensors": weights[:100]})),
           400, "file", "adapter_model.safetensors", "runs past the end")
    _error(_upload(a, _name("x"), TEXT, _tar({"adapter_model.safetensors": weights})), 400, "file",
           "adapter_config.json is missing")
    _error(_upload(a, _name("x"), IMAGE, archive_adapter(loras["text"])), 400, "file",
           "not a Stable Diffusion adapter")
    assert not [x for x in a.get("/v1/adapters").json()["data"] if x["name"].startswith(("p-", "x-"))]


def test_names_models_and_sizes_are_checked(clients: dict[str, httpx.Client], loras: dict[str, Path]) -> None:
    a, b = clients["a"], clients["b"]
    archive = archive_adapter(loras["text"])
    name = _name("dup")
    assert _upload(a, name, TEXT, archive).status_code == 200
    err = _error(_upload(a, name, TEXT, archive), 409, "name", name, "already exists")
    assert err["code"] == "adapter_exists"
    assert _upload(b, name, TEXT, archive).status_code == 200  # names are per tenant
    assert _error(_upload(a, REGISTRY_LORA, TEXT, archive), 409, "name", "registry")["code"] == "adapter_exists"
    _error(_upload(a, "Bad Name!", TEXT, archive), 400, "name", "a-z")
    _error(_upload(a, _name("m"), "no-such-model", archive), 400, "model", "not in the registry")
    _error(_upload(a, _name("m"), "echo", archive), 400, "model", "does not serve adapters")
    # Incompressible padding: the archive itself is over GENQ_MAX_ADAPTER_BYTES.
    big = _tar({"adapter_config.json": os.urandom(MAX_ADAPTER_BYTES)})
    assert _error(_upload(a, _name("big"), TEXT, big), 413, "file", str(MAX_ADAPTER_BYTES))["code"] == \
        "file_too_large"


# --- naming adapters in requests ------------------------------------------------------------------

@pytest.fixture(scope="module")
def uploaded(clients: dict[str, httpx.Client], loras: dict[str, Path]) -> dict[str, str]:
    """Tenant a's text adapter: name and id."""
    name = _name("mine")
    obj = _upload(clients["a"], name, TEXT, archive_adapter(loras["text"])).json()
    return {"name": name, "id": obj["id"]}


def test_a_job_naming_an_adapter_stores_its_id(clients: dict[str, httpx.Client], uploaded: dict[str, str],
                                               pg_url: str) -> None:
    a = clients["a"]
    ids = []
    for ref in (uploaded["name"], uploaded["id"], REGISTRY_LORA):
        resp = a.post("/v1/jobs", json=_text_line(ref))
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    assert [b["adapter"] for b in _stored_bodies(pg_url, ids)] == [uploaded["id"], uploaded["id"], REGISTRY_LORA]
    for job_id in ids:
        a.post(f"/v1/jobs/{job_id}/cancel")


def test_another_tenant_cannot_use_the_adapter(clients: dict[str, httpx.Client], uploaded: dict[str, str]) -> None:
    b = clients["b"]
    for ref in (uploaded["id"], uploaded["name"]):
        err = _error(b.post("/v1/jobs", json=_text_line(ref)), 400, "body.adapter", repr(ref), "not registered")
        assert err["code"] == "adapter_not_found"
    assert b.post("/v1/jobs", json=_text_line(REGISTRY_LORA)).status_code == 202  # registry adapters: everyone


def test_an_adapter_for_another_model_is_refused(clients: dict[str, httpx.Client], uploaded: dict[str, str]) -> None:
    a = clients["a"]
    _error(a.post("/v1/jobs", json=_text_line(uploaded["name"], model=TEXT_B)), 400, "body.adapter",
           f"is for model {TEXT!r}, not {TEXT_B!r}")
    _error(a.post("/v1/jobs", json=_text_line(uploaded["name"], model="echo")), 400, "body.adapter",
           "does not serve adapters")


def test_sync_endpoints_resolve_adapters(clients: dict[str, httpx.Client], uploaded: dict[str, str]) -> None:
    a = clients["a"]
    body = {"model": TEXT, "prompt": "x", "max_tokens": 2}
    _error(a.post("/v1/completions", json={**body, "adapter": "nope"}), 400, "body.adapter", "'nope'")
    # Accepted, then no worker serves the model: 503 after start_timeout, so validation passed.
    resp = a.post("/v1/completions", params={"start_timeout": 0.2}, json={**body, "adapter": uploaded["name"]})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_worker_available", resp.text


def test_batch_errors_name_the_line_and_field(clients: dict[str, httpx.Client], uploaded: dict[str, str]) -> None:
    a = clients["a"]
    lines = [_text_line(uploaded["name"], custom_id="1"), _text_line(REGISTRY_LORA, custom_id="2"),
             _text_line("unknown-lora", custom_id="3")]
    for resp in (a.post("/v1/batches", json={"requests": lines}),
                 a.post("/v1/batches", content="\n".join(json.dumps(x) for x in lines).encode(),
                        headers={"Content-Type": "application/x-ndjson"})):
        err = _error(resp, 400, "body.adapter", "line 3: body.adapter:", "'unknown-lora'")
        assert err["line"] == 3 and [e["line"] for e in err["errors"]] == [3]
    resp = a.post("/v1/batches", json={"requests": lines[:2]})
    assert resp.status_code == 202, resp.text
    a.post(f"/v1/batches/{resp.json()['id']}/cancel")


def _file_batch(c: httpx.Client, lines: list[dict[str, Any]]) -> dict[str, Any]:
    data = "\n".join(json.dumps(x) for x in lines).encode()
    file_id = c.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}).json()["id"]
    batch = c.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                        "completion_window": "24h"}).json()
    return dict(wait_for(lambda: (got := c.get(f"/v1/batches/{batch['id']}").json())["status"] != "validating"
                         and got, 30, what="file batch validated"))


def test_file_batches_resolve_adapters_in_the_background(clients: dict[str, httpx.Client], uploaded: dict[str, str],
                                                         pg_url: str) -> None:
    a, b = clients["a"], clients["b"]
    batch = _file_batch(a, [_text_line(uploaded["name"], custom_id="1"), _text_line(REGISTRY_LORA, custom_id="2")])
    assert batch["status"] == "in_progress", batch
    jobs = a.get(f"/v1/batches/{batch['id']}/jobs").json()["data"]
    bodies = _stored_bodies(pg_url, [j["id"] for j in jobs])
    assert [x["adapter"] for x in bodies] == [uploaded["id"], REGISTRY_LORA]
    a.post(f"/v1/batches/{batch['id']}/cancel")
    # Tenant b's file naming a's adapter on line 2 fails validation, naming the line and the field.
    failed = _file_batch(b, [_text_line(REGISTRY_LORA, custom_id="1"), _text_line(uploaded["name"], custom_id="2")])
    assert failed["status"] == "failed"
    errors = failed["errors"]["data"] if isinstance(failed["errors"], dict) else failed["errors"]
    assert [(e["line"], e["param"]) for e in errors] == [(2, "body.adapter")]


def test_cli_create_list_delete(api: Stack, clients: dict[str, httpx.Client], loras: dict[str, Path]) -> None:
    key = clients["a"].headers["Authorization"].removeprefix("Bearer ")
    env = {**api.env, "GENQ_API_KEY": key}
    name = _name("cli")

    def genq(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "genq", "adapters", *args, "--api", api.base_url], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    adapter_id = genq("create", name, "--model", TEXT, str(loras["text"])).split()[-1]
    assert adapter_id.startswith("adapter_")
    assert f"{adapter_id}\t{name}\t{TEXT}\tuser\t4" in genq("list")
    assert f"deleted adapter {adapter_id}" in genq("delete", adapter_id)
    assert adapter_id not in genq("list", "--model", TEXT)
