"""Auth, quotas and limits on an in-process app (SQLite, file storage, in-memory broker, no worker,
so submitted jobs stay queued)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from genq.services.auth import create_key
from genq.services.guards import RequestRate
from genq.services.state import Limits
from genq.services.validation import validate_line
from genq.shared.config import ConfigError, build_settings
from tests.support.app import api_client
from tests.unit.test_validation import REG

LINE = {"url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2}}


def _client(tmp_path: Path, auth: str = "required", **limits: Any) -> TestClient:
    return api_client(tmp_path, auth=auth, limits=limits)


def _key(client: TestClient, tenant: str) -> dict[str, str]:
    with client.app.state.genq.sessions() as s:  # type: ignore[attr-defined]
        _, key = create_key(s, tenant=tenant)
        s.commit()
    return {"Authorization": f"Bearer {key}"}


def test_without_a_valid_key_every_route_but_the_probes_is_401(tmp_path: Path) -> None:
    with _client(tmp_path) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/jobs"),
                             ("GET", "/v1/jobs/job_x"), ("GET", "/v1/batches"), ("GET", "/v1/files"),
                             ("GET", "/v1/webhooks/secret"), ("GET", "/v1/batches/batch_x/events")]:
            for headers in ({}, {"Authorization": "Bearer gq_" + "A" * 43}, {"Authorization": "Basic abc"}):
                resp = c.request(method, path, headers=headers)
                assert resp.status_code == 401, (method, path, headers)
                assert resp.headers["www-authenticate"] == "Bearer"
                err = resp.json()["error"]
                assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        good = _key(c, "acme")
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.get("/metrics", headers=good).status_code == 403  # the operator's, see below


TOKEN = "op-" + "t" * 40


@pytest.mark.parametrize(("auth", "token"), [("required", TOKEN), ("required", None), ("off", TOKEN)])
def test_metrics_take_only_the_operator_token(tmp_path: Path, auth: str, token: str | None) -> None:
    settings = {"metrics_token": token} if token else {}
    with api_client(tmp_path, auth=auth, **settings) as c:
        tenant = _key(c, "acme")
        assert c.get("/metrics").status_code == 401
        for headers in (tenant, {"Authorization": "Bearer " + TOKEN[:-1] + "x"}):
            resp = c.get("/metrics", headers=headers)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "permission_denied"
            assert resp.json()["error"]["type"] == "permission_error"
        ok = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == (200 if token else 403)
        if token:
            assert "genq_jobs" in ok.text


def test_metrics_are_open_while_auth_is_off_and_no_token_is_set(tmp_path: Path) -> None:
    with api_client(tmp_path, auth="off") as c:
        assert c.get("/metrics").status_code == 200


def test_a_short_operator_token_stops_the_process(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GENQ_METRICS_TOKEN: must be at least 24"):
        build_settings(metrics_token="short")


def test_auth_off_ignores_keys(tmp_path: Path) -> None:
    with _client(tmp_path, auth="off") as c:
        assert c.get("/v1/batches").status_code == 200
        assert c.get("/v1/batches", headers={"Authorization": "Bearer nonsense"}).status_code == 200


def test_a_revoked_key_stops_after_the_cache_entry_expires(tmp_path: Path) -> None:
    from genq.services.auth import revoke_key

    with _client(tmp_path) as c:
        headers = _key(c, "acme")
        assert c.get("/v1/batches", headers=headers).status_code == 200
        with c.app.state.genq.sessions() as s:  # type: ignore[attr-defined]
            revoke_key(s, headers["Authorization"].split()[1][:11])
            s.commit()
        assert c.get("/v1/batches", headers=headers).status_code == 200  # cached
        c.app.state.genq.keys._entries.clear()  # type: ignore[attr-defined]  # as if the TTL passed
        assert c.get("/v1/batches", headers=headers).status_code == 401


def test_tenants_see_only_their_own_objects(tmp_path: Path) -> None:
    with _client(tmp_path) as c:
        a, b = _key(c, "acme"), _key(c, "beta")
        job = c.post("/v1/jobs", json=LINE, headers=a).json()
        batch = c.post("/v1/batches", json={"requests": [{**LINE, "custom_id": "1"}]}, headers=a).json()
        file = c.post("/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"},
                      headers=a).json()
        for path in (f"/v1/jobs/{job['id']}", f"/v1/batches/{batch['id']}", f"/v1/batches/{batch['id']}/jobs",
                     f"/v1/batches/{batch['id']}/results", f"/v1/files/{file['id']}",
                     f"/v1/files/{file['id']}/content"):
            assert c.get(path, headers=b).status_code == 404, path
            assert c.get(path, headers=a).status_code == 200, path
        # (the owner's event stream would follow the still-queued batch forever, so only B's 404 here)
        assert c.get(f"/v1/batches/{batch['id']}/events", headers=b).status_code == 404
        assert c.get(f"/v1/jobs/{job['id']}/outputs/0.png", headers=b).status_code == 404
        assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=b).status_code == 404
        assert c.post(f"/v1/batches/{batch['id']}/cancel", headers=b).status_code == 404
        assert c.delete(f"/v1/files/{file['id']}", headers=b).status_code == 404
        by_file = c.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/completions"},
                         headers=b)
        assert by_file.status_code == 404
        assert c.get("/v1/batches", headers=b).json()["data"] == []
        assert c.get("/v1/files", headers=b).json()["data"] == []
        assert [x["id"] for x in c.get("/v1/batches", headers=a).json()["data"]] == [batch["id"]]
        secret_a = c.get("/v1/webhooks/secret", headers=a).json()["secret"]
        secret_b = c.get("/v1/webhooks/secret", headers=b).json()["secret"]
        assert secret_a != secret_b
        assert c.get(f"/v1/jobs/{job['id']}", headers=a).json()["status"] == "queued"


def test_queued_job_ceiling_answers_429_with_retry_after(tmp_path: Path) -> None:
    with _client(tmp_path, max_queued_jobs=3) as c:
        a, b = _key(c, "acme"), _key(c, "beta")
        lines = [{**LINE, "custom_id": str(i)} for i in range(2)]
        assert c.post("/v1/batches", json={"requests": lines}, headers=a).status_code == 202
        assert c.post("/v1/jobs", json=LINE, headers=a).status_code == 202
        over = c.post("/v1/jobs", json=LINE, headers=a)
        assert over.status_code == 429 and int(over.headers["retry-after"]) > 0
        err = over.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "queued_jobs_limit"
        assert "limit of 3" in err["message"] and "GENQ_MAX_QUEUED_JOBS" in err["message"]
        too_big = c.post("/v1/batches", json={"requests": [{**LINE, "custom_id": str(i)} for i in range(4)]},
                         headers=b)
        assert too_big.status_code == 429 and "split it" in too_big.json()["error"]["message"]
        assert c.post("/v1/jobs", json=LINE, headers=b).status_code == 202  # the other tenant has room
        batch_id = c.get("/v1/batches", headers=a).json()["data"][0]["id"]
        assert c.post(f"/v1/batches/{batch_id}/cancel", headers=a).status_code == 200  # ended jobs free the quota
        assert c.post("/v1/jobs", json=LINE, headers=a).status_code == 202


def test_a_file_batch_over_the_ceiling_fails_validation(tmp_path: Path) -> None:
    with _client(tmp_path, max_queued_jobs=2) as c:
        a = _key(c, "acme")
        body = "".join(json.dumps({**LINE, "custom_id": str(i)}) + "\n" for i in range(3)).encode()
        file = c.post("/v1/files", files={"file": ("in.jsonl", body)}, data={"purpose": "batch"}, headers=a).json()
        made = c.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/completions"}, headers=a)
        assert made.status_code == 202
        batch = c.get(f"/v1/batches/{made.json()['id']}", headers=a).json()
    assert batch["status"] == "failed"
    [err] = batch["errors"]["data"]
    assert err["code"] == "queued_jobs_limit" and "GENQ_MAX_QUEUED_JOBS" in err["message"]


def test_request_rate_is_limited_per_tenant(tmp_path: Path) -> None:
    with _client(tmp_path, rate_limit_per_minute=2) as c:
        a, b = _key(c, "acme"), _key(c, "beta")
        assert [c.post("/v1/jobs", json=LINE, headers=a).status_code for _ in range(2)] == [202, 202]
        over = c.post("/v1/completions", json=LINE["body"], headers=a)
        # A moving window of a minute: room again when the first of the two leaves it, ~60 s on.
        assert over.status_code == 429 and 50 <= int(over.headers["retry-after"]) <= 60
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        assert "2 create requests per minute" in over.json()["error"]["message"]
        assert c.get("/v1/batches", headers=a).status_code == 200  # reads are not limited
        assert c.post("/v1/jobs", json=LINE, headers=b).status_code == 202


def test_request_rate_is_a_moving_window() -> None:
    rate = RequestRate(window_s=1)  # a one-second window, so that the test can wait it out
    assert [rate.take("t", 3) for _ in range(3)] == [0.0] * 3
    wait = rate.take("t", 3)
    assert 0.5 < wait <= 1.0  # until the first request leaves the window
    assert rate.take("t", 3) > 0  # a refused request does not count
    assert rate.take("u", 3) == 0.0 and rate.take("t", 0) == 0.0  # per tenant; 0 = unlimited
    time.sleep(wait + 0.05)
    assert rate.take("t", 3) == 0.0


def test_request_rate_storage_follows_the_broker() -> None:
    from limits.storage import MemoryStorage, RedisStorage

    assert isinstance(RequestRate.for_broker("sqla+sqlite:///./var/broker.db").storage, MemoryStorage)
    assert isinstance(RequestRate.for_broker("memory://").storage, MemoryStorage)
    shared = RequestRate.for_broker("redis://127.0.0.1:6379/5")  # connects on first use
    assert isinstance(shared.storage, RedisStorage) and shared.storage.key_prefix == "genq-rate"


def test_request_rate_lets_requests_through_when_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    rate = RequestRate.for_broker("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with caplog.at_level(logging.WARNING, logger="genq.api"):
        assert [rate.take("t", 1) for _ in range(3)] == [0.0] * 3
    assert [r.message for r in caplog.records if "rate limit storage unavailable" in r.message][:1]
    assert len([r for r in caplog.records if "rate limit" in r.message]) == 1  # logged once, not per request


def test_prompt_length_and_body_size_limits(tmp_path: Path) -> None:
    with _client(tmp_path, auth="off", max_prompt_chars=10, max_body_bytes=2000) as c:
        long = c.post("/v1/jobs", json={**LINE, "body": {**LINE["body"], "prompt": "x" * 11}})
        assert long.status_code == 400 and long.json()["error"]["param"] == "body.prompt"
        assert "at most 10 characters, got 11" in long.json()["error"]["message"]
        many = c.post("/v1/batches", json={"requests": [
            {**LINE, "custom_id": "a", "body": {**LINE["body"], "prompt": ["ok", "y" * 12]}}]})
        assert many.status_code == 400 and many.json()["error"]["param"] == "body.prompt[1]"
        big = c.post("/v1/jobs", json={**LINE, "body": {**LINE["body"], "prompt": "x" * 3000}})
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"


def test_validate_line_checks_image_prompts() -> None:
    line = {"url": "/v1/images/generations", "body": {"model": "img", "prompt": "ok", "negative_prompt": "n" * 9}}
    ok, errors = validate_line(line, 3, REG, max_prompt_chars=8)
    assert ok is None and errors[0].param == "body.negative_prompt"
    assert errors[0].as_dict()["message"] == "line 3: body.negative_prompt: must be at most 8 characters, got 9"


def test_limits_come_from_settings() -> None:
    s = build_settings(max_queued_jobs=5, rate_limit_per_minute=7, max_batch_lines=9, max_body_bytes=1234,
                       max_prompt_chars=11)
    limits = Limits.from_settings(s)
    assert (limits.max_queued_jobs, limits.rate_limit_per_minute, limits.max_batch_lines, limits.max_body_bytes,
            limits.max_file_bytes, limits.max_prompt_chars) == (5, 7, 9, 1234, 1234, 11)
    assert Limits.from_settings(build_settings()) == Limits()
    with pytest.raises(ConfigError, match="GENQ_MAX_QUEUED_JOBS: must be a whole number of at least 1"):
        build_settings(max_queued_jobs=0)
    with pytest.raises(ConfigError, match="GENQ_RATE_LIMIT_PER_MINUTE: must be 0"):
        build_settings(rate_limit_per_minute=-1)


def _queued(client: TestClient) -> int:
    from sqlalchemy import func, select

    from genq.shared.db import Job

    with client.app.state.genq.sessions() as s:  # type: ignore[attr-defined]
        return int(s.execute(select(func.count()).select_from(Job).where(Job.status == "queued")).scalar_one())


def test_waiting_sync_requests_are_capped_per_tenant(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.waiting import wait_for

    with _client(tmp_path, max_sync_waits_per_tenant=2) as c, ThreadPoolExecutor(2) as pool:
        a, b = _key(c, "acme"), _key(c, "beta")
        waiting = [pool.submit(c.post, "/v1/completions", params={"start_timeout": 3}, json=LINE["body"], headers=a)
                   for _ in range(2)]
        wait_for(lambda: _queued(c) == 2, 10, 0.02, "two waiting requests")
        over = c.post("/v1/completions", json=LINE["body"], headers=a)
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
        err = over.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "sync_waits_limit"
        assert "at most 2 per tenant" in err["message"] and _queued(c) == 2  # no job was made for it
        # Another tenant has places of its own; the waits end as before (no worker: 503).
        other = c.post("/v1/completions", params={"start_timeout": 0.1}, json=LINE["body"], headers=b)
        assert other.status_code == 503
        assert [f.result().status_code for f in waiting] == [503, 503]
        again = c.post("/v1/completions", params={"start_timeout": 0.1}, json=LINE["body"], headers=a)
        assert again.status_code == 503, again.text  # their places are free again


def test_sync_wait_counts_follow_the_broker() -> None:
    from genq.services.sync_waits import SyncWaits

    assert SyncWaits.for_broker("sqla+sqlite:///./var/broker.db").redis is None
    assert SyncWaits.for_broker("redis://127.0.0.1:6379/5").redis is not None  # connects on first use
    with pytest.raises(ConfigError, match="GENQ_MAX_SYNC_WAITS_PER_TENANT: must be 0"):
        build_settings(max_sync_waits_per_tenant=-1)
