"""Webhook signing (Standard Webhooks), subscription checks, secrets and enqueueing, on SQLite."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from genq.services import webhooks as wh
from genq.shared import webhooks as events
from genq.shared.db import Batch, Job, Tenant, WebhookDelivery, new_id, session_factory, session_scope
from genq.shared.migrate import upgrade

# The published Standard Webhooks example (standard-webhooks spec and the svix libraries' tests).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(msg_id: str, ts: int, sig: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


def test_sign_matches_the_published_example() -> None:
    assert wh.sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIG


def test_sign_matches_an_independent_hmac() -> None:
    key = bytes(range(24))
    secret = "whsec_" + base64.b64encode(key).decode()
    body = b'{"type":"job.completed","data":{"id":"job_1"}}'
    mac = hmac.new(key, b"msg_abc.1700000000." + body, hashlib.sha256).digest()
    assert wh.sign(secret, "msg_abc", 1700000000, body) == "v1," + base64.b64encode(mac).decode()


def test_verify_accepts_good_and_rejects_tampered_or_stale() -> None:
    good = headers(SPEC_ID, SPEC_TS, SPEC_SIG)
    assert wh.verify(SPEC_SECRET, good, SPEC_BODY, now=SPEC_TS + 10)
    # Header names are case-insensitive; several signatures may be sent (key rotation).
    rotated = {"Webhook-Id": SPEC_ID, "Webhook-Timestamp": str(SPEC_TS),
               "Webhook-Signature": f"v1,{base64.b64encode(b'x' * 32).decode()} {SPEC_SIG}"}
    assert wh.verify(SPEC_SECRET, rotated, SPEC_BODY, now=SPEC_TS)

    assert not wh.verify(SPEC_SECRET, good, SPEC_BODY + b" ", now=SPEC_TS)  # tampered body
    assert not wh.verify(SPEC_SECRET, headers("msg_other", SPEC_TS, SPEC_SIG), SPEC_BODY, now=SPEC_TS)
    assert not wh.verify(SPEC_SECRET, good, SPEC_BODY, now=SPEC_TS + 301)  # too old
    assert not wh.verify(SPEC_SECRET, good, SPEC_BODY, now=SPEC_TS - 301)  # from the future
    other = "whsec_" + base64.b64encode(b"k" * 24).decode()
    assert not wh.verify(other, good, SPEC_BODY, now=SPEC_TS)  # wrong secret
    assert not wh.verify(SPEC_SECRET, {"webhook-id": SPEC_ID}, SPEC_BODY, now=SPEC_TS)
    assert not wh.verify(SPEC_SECRET, headers(SPEC_ID, SPEC_TS, SPEC_SIG.replace("v1,", "v2,")), SPEC_BODY,
                         now=SPEC_TS)
    assert not wh.verify(SPEC_SECRET, headers(SPEC_ID, "soon", SPEC_SIG), SPEC_BODY, now=SPEC_TS)  # type: ignore[arg-type]


def test_verify_uses_the_clock_by_default() -> None:
    now = int(time.time())
    sig = wh.sign(SPEC_SECRET, "msg_x", now, b"{}")
    assert wh.verify(SPEC_SECRET, headers("msg_x", now, sig), b"{}")
    assert not wh.verify(SPEC_SECRET, headers(SPEC_ID, SPEC_TS, SPEC_SIG), SPEC_BODY)  # 2021 is long gone


def test_a_receiver_using_the_standardwebhooks_library_accepts_our_signature() -> None:
    from standardwebhooks import Webhook

    now = int(time.time())
    body = b'{"type":"job.completed","data":{"id":"job_1"}}'
    sent = headers("msg_lib", now, wh.sign(SPEC_SECRET, "msg_lib", now, body))
    assert Webhook(SPEC_SECRET).verify(body, sent) == {"type": "job.completed", "data": {"id": "job_1"}}


def test_verify_refuses_malformed_signatures_and_bodies_without_raising() -> None:
    for sigs in ("garbage", f"garbage {SPEC_SIG.replace('=', 'A')}", "v1,", ","):
        assert not wh.verify(SPEC_SECRET, headers(SPEC_ID, SPEC_TS, sigs), SPEC_BODY, now=SPEC_TS)
    assert wh.verify(SPEC_SECRET, headers(SPEC_ID, SPEC_TS, f"garbage {SPEC_SIG}"), SPEC_BODY, now=SPEC_TS)
    assert not wh.verify(SPEC_SECRET, headers(SPEC_ID, SPEC_TS, SPEC_SIG), b"\xff\xfe", now=SPEC_TS)
    assert not wh.verify(SPEC_SECRET, headers(SPEC_ID, f"{SPEC_TS}.5", SPEC_SIG), SPEC_BODY, now=SPEC_TS)  # type: ignore[arg-type]


@pytest.mark.parametrize(("url", "events", "message"), [
    ("ftp://example.com/hook", None, "http:// or https://"),
    ("https:///nohost", None, "with a host"),
    ("example.com/hook", None, "http:// or https://"),
    ("https://example.com/" + "a" * 2000, None, "at most 2000"),
    ("https://example.com/hook", ["completed", "finished"], "unknown webhook_events ['finished']"),
    ("https://example.com/hook", "completed", "list of strings"),
    (None, ["completed"], "needs a webhook_url"),
])
def test_validate_subscription_rejects(url: str | None, events: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        wh.validate_subscription(url, events)  # type: ignore[arg-type]


def test_validate_subscription_accepts() -> None:
    assert wh.validate_subscription(None, None) == (None, None)
    assert wh.validate_subscription("http://93.184.216.34:9/h", None) == ("http://93.184.216.34:9/h", None)
    assert wh.validate_subscription("https://x.example/h?a=1", ["progress", "failed", "progress"]) == (
        "https://x.example/h?a=1", ["progress", "failed"])


@pytest.fixture()
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    yield session_factory(url)


def _job(**kw: object) -> Job:
    values: dict[str, object] = {"id": new_id("job"), "url": "/v1/completions", "model": "m", "body": {},
                                 "status": "succeeded", "created_at": time.time(), "finished_at": time.time()}
    values.update(kw)
    return Job(**values)


def test_tenant_secret_is_created_once_and_per_tenant(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as s:
        first = wh.tenant_secret(s, None)
        assert wh.tenant_secret(s, None) == first
        other = wh.tenant_secret(s, "acme")
    assert first.startswith("whsec_") and len(base64.b64decode(first.removeprefix("whsec_"))) == 24
    assert other != first
    with session_scope(factory) as s:
        assert wh.tenant_secret(s, None) == first
        assert s.get(Tenant, "default").webhook_secret == first  # type: ignore[union-attr]


def test_enqueue_job_event_follows_the_subscription(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as s:
        subscribed = _job(webhook_url="https://example.com/h",
                          result={"created": 1, "data": [{}], "output_keys": ["jobs/x/0.png"]})
        only_failed = _job(webhook_url="https://example.com/h", webhook_events=["failed"])
        in_batch = _job(batch_id="batch_1")  # no webhook of its own: the batch reports
        s.add_all([subscribed, only_failed, in_batch])
        s.flush()
        d = events.enqueue_job_event(s, subscribed, "completed")
        assert events.enqueue_job_event(s, only_failed, "completed") is None
        assert events.enqueue_job_event(s, in_batch, "completed") is None
        with pytest.raises(ValueError):
            events.enqueue_job_event(s, subscribed, "finished")
    assert d is not None
    with session_scope(factory) as s:
        rows = s.execute(select(WebhookDelivery)).scalars().all()
    assert [r.id for r in rows] == [d.id] and d.id.startswith("msg_")
    row = rows[0]
    assert (row.status, row.attempts, row.event, row.object_id) == ("pending", 0, "job.completed", subscribed.id)
    assert row.payload["type"] == "job.completed" and row.payload["timestamp"].endswith("Z")
    data = row.payload["data"]
    assert data["object"] == "job" and data["id"] == subscribed.id and data["status"] == "succeeded"
    assert data["result"] == {"created": 1, "data": [{}]}  # internal object keys never leave


def test_enqueue_batch_event_and_notify_helpers(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as s:
        batch = Batch(id=new_id("batch"), endpoint="/v1/completions", status="completed", total=2,
                      created_at=time.time(), completed_at=time.time(), webhook_url="https://example.com/b")
        s.add(batch)
        s.add_all([_job(batch_id=batch.id, seq=0), _job(batch_id=batch.id, seq=1, status="failed")])
        s.flush()
        assert events.enqueue_batch_event(s, batch, "progress") is None  # not in the default events
        d = events.notify_batch(s, batch.id)
    assert d is not None and d.event == "batch.completed"
    counts = d.payload["data"]["request_counts"]
    assert (counts["total"], counts["completed"], counts["failed"]) == (2, 1, 1)


def test_routes_show_the_secret_and_deliveries_with_attempts(factory: sessionmaker[Session]) -> None:
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from genq.services.routes import webhooks as routes_webhooks
    from genq.shared.db import WebhookAttempt

    app = FastAPI()
    app.state.genq = SimpleNamespace(sessions=factory, settings=SimpleNamespace(auth="off"))  # no tenant
    app.include_router(routes_webhooks.router)
    with session_scope(factory) as s:
        jobs = [_job(webhook_url="https://example.com/h"), _job(webhook_url="https://example.com/h")]
        s.add_all(jobs)
        s.flush()
        first = events.enqueue_job_event(s, jobs[0], "completed")
        events.enqueue_job_event(s, jobs[1], "completed")
        assert first is not None
        s.add(WebhookAttempt(delivery_id=first.id, attempt=1, at=time.time(), status_code=500, error="http_status",
                             duration_s=0.0123))
    with TestClient(app) as client:
        secret = client.get("/v1/webhooks/secret").json()
        assert secret["object"] == "webhook_secret" and secret["secret"].startswith("whsec_")
        assert client.get("/v1/webhooks/secret").json() == secret
        page = client.get("/v1/webhooks/deliveries", params={"object_id": jobs[0].id}).json()
        assert client.get("/v1/webhooks/deliveries", params={"limit": 1}).json()["has_more"] is True
    with session_scope(factory) as s:
        assert wh.tenant_secret(s, None) == secret["secret"]
    [d] = page["data"]
    assert (d["id"], d["type"], d["status"], d["object_id"]) == (first.id, "job.completed", "pending", jobs[0].id)
    assert d["attempt_log"] == [{"attempt": 1, "at": d["attempt_log"][0]["at"], "status_code": 500,
                                 "error": "http_status", "duration_ms": 12.3}]


def test_deliveries_show_error_categories_never_raw_socket_errors(factory: sessionmaker[Session]) -> None:
    """Rows from before the categories hold the raw text; the tenant still sees only a category."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from genq.services.routes import webhooks as routes_webhooks
    from genq.shared.db import WebhookAttempt

    app = FastAPI()
    app.state.genq = SimpleNamespace(sessions=factory, settings=SimpleNamespace(auth="off"))
    app.include_router(routes_webhooks.router)
    raw = ["ConnectError: [Errno 111] Connection refused", "RemoteProtocolError: Server disconnected without "
           "sending a response.", "HTTP 404", "timeout after 10s", "address_not_allowed"]
    with session_scope(factory) as s:
        job = _job(webhook_url="https://example.com/h")
        s.add(job)
        s.flush()
        d = events.enqueue_job_event(s, job, "completed")
        assert d is not None
        s.add_all([WebhookAttempt(delivery_id=d.id, attempt=i, at=time.time(), error=e, duration_s=0.1)
                   for i, e in enumerate(raw, start=1)])
        d.last_error = raw[0]
    with TestClient(app) as client:
        [shown] = client.get("/v1/webhooks/deliveries").json()["data"]
    assert shown["last_error"] == "connection_failed"
    assert [a["error"] for a in shown["attempt_log"]] == [
        "connection_failed", "connection_failed", "http_status", "timeout", "address_not_allowed"]
