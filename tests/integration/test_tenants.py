"""Tenants end to end: API processes of our own with GENQ_AUTH=required, against the same Postgres,
Redis, S3 and registry as the shared stack, whose workers run the jobs. Keys come from
`genq keys create`, as an operator makes them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

PROBES = {"/healthz", "/readyz"}
OPERATOR_TOKEN = "operator-" + "k" * 32  # GENQ_METRICS_TOKEN of the auth API
IDLE = "tenants-idle"  # a model in our API's registry that no worker serves: its jobs stay queued


def make_key(env: dict[str, str], tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "genq", "keys", "create", "--tenant", tenant], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    key = out.stdout.split()[-1]
    assert key.startswith("gq_") and f"tenant {tenant}" in out.stdout
    return key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _start_api(env: dict[str, str], logdir: Path) -> Stack:
    api = Stack(env, logdir)
    try:
        api.start_api()
    except BaseException:
        print(api.logs())
        api.stop()
        raise
    return api


@pytest.fixture(scope="module")
def auth_api(stack: Stack, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API with GENQ_AUTH=required and default limits; the shared stack's workers run its jobs."""
    api = _start_api({**stack_env, "GENQ_AUTH": "required", "GENQ_METRICS_TOKEN": OPERATOR_TOKEN},
                     tmp_path_factory.mktemp("auth-api"))
    yield api
    api.stop()


@pytest.fixture(scope="module")
def quota_api(stack: Stack, stack_env: dict[str, str], tiny_registry: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API with low limits, and a registry with one more model that no worker ever serves."""
    registry = tiny_registry.parent / "models-tenants.toml"
    registry.write_text(tiny_registry.read_text() + f'\n[models.{IDLE}]\nkind = "echo"\nsource = "none"\n')
    env = {**stack_env, "GENQ_AUTH": "required", "GENQ_MODELS_FILE": str(registry),
           "GENQ_RATE_LIMIT_PER_MINUTE": "3", "GENQ_MAX_QUEUED_JOBS": "2", "GENQ_MAX_PROMPT_CHARS": "50",
           "GENQ_MAX_BODY_BYTES": "4096"}
    api = _start_api(env, tmp_path_factory.mktemp("quota-api"))
    yield api
    api.stop()


@pytest.fixture(scope="module")
def keys(auth_api: Stack) -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    return {"a": make_key(auth_api.env, f"acme-{tag}"), "b": make_key(auth_api.env, f"beta-{tag}")}


def _echo(prompt: str, custom_id: str | None = None, **extra: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"url": "/v1/completions", "body": {"model": "echo", "prompt": prompt}, **extra}
    return {**line, "custom_id": custom_id} if custom_id else line


def _done(c: httpx.Client, path: str, key: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    return wait_for(lambda: (o := c.get(path, headers=auth(key)).json())["status"] in statuses and o, 120, 0.1,
                    f"{path} finished")


# --- authentication --------------------------------------------------------------------------------

def test_every_route_but_the_probes_needs_a_valid_key(auth_api: Stack, keys: dict[str, str],
                                                      tmp_path: Path) -> None:
    from genq.services.app import create_app
    from genq.shared.config import build_settings

    # With auth on, the API does not serve its own documents: read the route list offline.
    offline = build_settings(database_url=f"sqlite:///{tmp_path}/o.db", broker_url="memory://",
                             storage_url=f"file://{tmp_path}/o")
    spec = create_app(offline, migrate=False, maintenance=False).openapi()
    with auth_api.client() as c:
        for hidden in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(hidden).status_code == 404
        routes = [(m.upper(), re.sub(r"\{[^}]+\}", "x_0", p)) for p, item in spec["paths"].items() for m in item]
        assert len(routes) > 20 and ("GET", "/metrics") in routes and ("GET", "/v1/models") in routes
        for method, path in routes:
            if path in PROBES:
                assert c.request(method, path).status_code == 200, path
                continue
            if path == "/metrics":  # the operator's: a tenant key is refused, see below
                continue
            for headers in ({}, auth("gq_" + "x" * 43), {"Authorization": keys["a"]}):  # none, wrong, no scheme
                resp = c.request(method, path, headers=headers)
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.headers["www-authenticate"] == "Bearer"
                assert resp.json()["error"]["type"] == "authentication_error"
                assert resp.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers=auth(keys["a"])).status_code == 200


def test_metrics_are_the_operators_and_carry_no_tenant_data(auth_api: Stack, keys: dict[str, str]) -> None:
    with auth_api.client() as c:
        job = c.post("/v1/jobs", json=_echo("metrics"), headers=auth(keys["a"])).json()
        _done(c, f"/v1/jobs/{job['id']}", keys["a"], ("succeeded",))
        # Every tenant's counts are in there: no tenant key reads them, only the operator token.
        assert c.get("/metrics").status_code == 401
        for key in (keys["a"], keys["b"], "not-the-token-" + "x" * 30):
            refused = c.get("/metrics", headers=auth(key))
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "permission_denied"
        text = c.get("/metrics", headers=auth(OPERATOR_TOKEN)).text
    assert "genq_jobs{" in text and 'model="echo"' in text
    labels = set(re.findall(r"(\w+)=\"", text))
    assert labels <= {"model", "status", "le", "worker"}, labels  # worker: host:pid:random, no tenant
    assert "acme-" not in text and "beta-" not in text


# --- isolation ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def owned(auth_api: Stack, keys: dict[str, str]) -> dict[str, Any]:
    """Tenant A's finished job (with a webhook), image job, inline batch and file batch."""
    a = keys["a"]
    with auth_api.client() as c:
        job = c.post("/v1/jobs", json=_echo("mine", webhook_url="http://127.0.0.1:9/hook"), headers=auth(a)).json()
        image = c.post("/v1/jobs", headers=auth(a), json={"url": "/v1/images/generations", "body": {
            "model": "tiny-sd", "prompt": "a red cube", "size": "32x32", "num_inference_steps": 2, "seed": 1}}).json()
        batch = c.post("/v1/batches", json={"requests": [_echo("x", "1"), _echo("y", "2")]}, headers=auth(a)).json()
        body = "".join(json.dumps(_echo(f"f{i}", f"f{i}")) + "\n" for i in range(2)).encode()
        file = c.post("/v1/files", files={"file": ("in.jsonl", body)}, data={"purpose": "batch"},
                      headers=auth(a)).json()
        from_file = c.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/completions"},
                           headers=auth(a)).json()
        job = _done(c, f"/v1/jobs/{job['id']}", a, ("succeeded",))
        image = _done(c, f"/v1/jobs/{image['id']}", a, ("succeeded",))
        batch = _done(c, f"/v1/batches/{batch['id']}", a, ("completed",))
        from_file = _done(c, f"/v1/batches/{from_file['id']}", a, ("completed",))
    return {"job": job, "image": image, "batch": batch, "file": file, "from_file": from_file}


def test_another_tenants_ids_are_404(auth_api: Stack, keys: dict[str, str], owned: dict[str, Any]) -> None:
    job, image, batch, file = owned["job"]["id"], owned["image"], owned["batch"], owned["file"]["id"]
    output_name = urlsplit(image["result"]["data"][0]["url"]).path.rsplit("/", 1)[-1]
    reads = [f"/v1/jobs/{job}", f"/v1/jobs/{image['id']}/outputs/{output_name}", f"/v1/batches/{batch['id']}",
             f"/v1/batches/{batch['id']}/jobs", f"/v1/batches/{batch['id']}/results",
             f"/v1/batches/{batch['id']}/events", f"/v1/files/{file}", f"/v1/files/{file}/content",
             f"/v1/files/{batch['output_file_id']}", f"/v1/files/{batch['output_file_id']}/content",
             f"/v1/batches/{owned['from_file']['id']}"]
    with auth_api.client() as c:
        for path in reads:
            theirs = c.get(path, headers=auth(keys["b"]))
            assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "not_found", (path, theirs.text)
            assert c.get(path, headers=auth(keys["a"])).status_code == 200, path
        png = c.get(reads[1], headers=auth(keys["a"]))
        assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
        writes = [("POST", f"/v1/jobs/{job}/cancel", None), ("POST", f"/v1/batches/{batch['id']}/cancel", None),
                  ("POST", f"/v1/batches/{batch['id']}/retry", {}), ("DELETE", f"/v1/files/{file}", None),
                  ("POST", "/v1/batches", {"input_file_id": file, "endpoint": "/v1/completions"})]
        for method, path, body in writes:
            resp = c.request(method, path, json=body, headers=auth(keys["b"]))
            assert resp.status_code == 404, (method, path, resp.text)
        assert c.get(f"/v1/files/{file}", headers=auth(keys["a"])).status_code == 200  # B's delete did nothing


def test_lists_show_only_own_objects(auth_api: Stack, keys: dict[str, str], owned: dict[str, Any]) -> None:
    with auth_api.client() as c:
        def ids(path: str, key: str) -> set[str]:
            return {o["id"] for o in c.get(path, params={"limit": 100}, headers=auth(key)).json()["data"]}

        mine = {owned["batch"]["id"], owned["from_file"]["id"]}
        assert mine <= ids("/v1/batches", keys["a"]) and not mine & ids("/v1/batches", keys["b"])
        files = {owned["file"]["id"], owned["batch"]["output_file_id"]}
        assert files <= ids("/v1/files", keys["a"]) and not files & ids("/v1/files", keys["b"])
        unauthenticated = httpx.get(f"{auth_api.base_url}/v1/batches")  # and nothing without a key
        assert unauthenticated.status_code == 401


def test_webhook_secrets_and_deliveries_are_per_tenant(auth_api: Stack, keys: dict[str, str],
                                                       owned: dict[str, Any]) -> None:
    job = owned["job"]["id"]
    with auth_api.client() as c:
        secret_a = c.get("/v1/webhooks/secret", headers=auth(keys["a"])).json()["secret"]
        secret_b = c.get("/v1/webhooks/secret", headers=auth(keys["b"])).json()["secret"]
        assert secret_a.startswith("whsec_") and secret_a != secret_b
        assert c.get("/v1/webhooks/secret", headers=auth(keys["a"])).json()["secret"] == secret_a

        def deliveries(key: str) -> list[dict[str, Any]]:
            return c.get("/v1/webhooks/deliveries", params={"object_id": job}, headers=auth(key)).json()["data"]

        wait_for(lambda: deliveries(keys["a"]), 60, what="tenant A's delivery recorded")
        assert deliveries(keys["b"]) == []
        all_b = c.get("/v1/webhooks/deliveries", params={"limit": 100}, headers=auth(keys["b"])).json()["data"]
        assert all(d["object_id"] != job for d in all_b)


# --- quotas and limits -----------------------------------------------------------------------------

def test_queued_jobs_ceiling(quota_api: Stack) -> None:
    key = make_key(quota_api.env, f"ceiling-{uuid.uuid4().hex[:6]}")
    idle = {"url": "/v1/completions", "body": {"model": IDLE, "prompt": "wait"}}
    with quota_api.client() as c:
        jobs = [c.post("/v1/jobs", json=idle, headers=auth(key)) for _ in range(2)]
        assert [r.status_code for r in jobs] == [202, 202]
        over = c.post("/v1/jobs", json=idle, headers=auth(key))
        assert over.status_code == 429, over.text
        assert int(over.headers["retry-after"]) > 0
        err = over.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "queued_jobs_limit"
        assert "limit of 2" in err["message"] and "GENQ_MAX_QUEUED_JOBS" in err["message"]
        for r in jobs:
            assert c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth(key)).json()["status"] == "cancelled"


def test_request_rate_limit(quota_api: Stack) -> None:
    key = make_key(quota_api.env, f"rate-{uuid.uuid4().hex[:6]}")
    with quota_api.client() as c:
        job = c.post("/v1/jobs", json=_echo("one"), headers=auth(key))
        uploads = [c.post("/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"},
                          headers=auth(key)) for _ in range(2)]
        assert [job.status_code] + [u.status_code for u in uploads] == [202, 200, 200]
        over = c.post("/v1/jobs", json=_echo("four"), headers=auth(key))
        assert over.status_code == 429, over.text
        # A moving window of a minute, counted in Redis: room again ~60 s after the first request.
        assert 50 <= int(over.headers["retry-after"]) <= 60
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        assert "3 create requests per minute" in over.json()["error"]["message"]
        assert "GENQ_RATE_LIMIT_PER_MINUTE" in over.json()["error"]["message"]
        assert c.get(f"/v1/jobs/{job.json()['id']}", headers=auth(key)).status_code == 200  # reads still work


def test_prompt_length_and_body_size(quota_api: Stack) -> None:
    key = make_key(quota_api.env, f"limits-{uuid.uuid4().hex[:6]}")
    with quota_api.client() as c:
        long = c.post("/v1/jobs", json=_echo("x" * 51), headers=auth(key))
        assert long.status_code == 400 and long.json()["error"]["param"] == "body.prompt"
        assert "at most 50 characters, got 51" in long.json()["error"]["message"]
        big = c.post("/v1/batches", headers={**auth(key), "Content-Type": "application/x-ndjson"},
                     content=b"".join(json.dumps(_echo("y" * 40, str(i))).encode() + b"\n" for i in range(60)))
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        assert "4096" in big.json()["error"]["message"]


def test_two_api_replicas_share_one_request_rate(redis_url: str, tmp_path: Path) -> None:
    """Two API apps (replicas) on one broker Redis count each tenant's requests together; with
    the in-memory storage (no Redis broker) each would allow the full rate by itself."""
    import redis
    from fastapi.testclient import TestClient

    from genq.services.app import create_app
    from genq.services.auth import create_key
    from genq.services.state import Limits
    from genq.shared.config import build_settings

    def replicas(broker: str, name: str) -> list[TestClient]:
        settings = build_settings(database_url=f"sqlite:///{tmp_path}/{name}.db", broker_url=broker,
                                  storage_url=f"file://{tmp_path}/{name}-objects", auth="required")
        return [TestClient(create_app(settings, limits=Limits(rate_limit_per_minute=3), maintenance=False))
                for _ in range(2)]

    def upload(client: TestClient, key: str) -> httpx.Response:
        return client.post("/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"},
                           headers=auth(key))

    tenant = f"replicas-{uuid.uuid4().hex[:8]}"
    a, b = replicas(redis_url, "shared")
    try:
        with a, b:
            with a.app.state.genq.sessions() as s:  # type: ignore[attr-defined]
                _, key = create_key(s, tenant=tenant)
                s.commit()
            assert [upload(c, key).status_code for c in (a, b, a)] == [200, 200, 200]
            for c in (b, a):  # the fourth and fifth request of the minute, whichever replica takes them
                over = upload(c, key)
                assert over.status_code == 429, over.text
                assert over.json()["error"]["code"] == "rate_limit_exceeded"
                assert 50 <= int(over.headers["retry-after"]) <= 60
            stored = redis.Redis.from_url(redis_url).keys(f"genq-rate:rate/{tenant}/*")
            assert len(stored) == 1  # one count, in the broker's Redis database
    finally:
        a.app.state.genq.rate.clear(tenant, 3)  # type: ignore[attr-defined]
    assert not redis.Redis.from_url(redis_url).keys(f"genq-rate:rate/{tenant}/*")

    # The embedded default: no Redis broker, so each process counts only its own requests.
    a, b = replicas("memory://", "alone")
    with a, b:
        with a.app.state.genq.sessions() as s:  # type: ignore[attr-defined]
            _, key = create_key(s, tenant=tenant)
            s.commit()
        assert [upload(c, key).status_code for c in (a, b, a, b, a, b)] == [200] * 6
        assert upload(a, key).status_code == upload(b, key).status_code == 429
