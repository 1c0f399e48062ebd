"""Webhook delivery end to end: a real HTTP receiver on loopback checks every signature itself.

The dispatcher runs against the real Postgres (and SQLite, the embedded default): one signed event
per state change, retries with backoff on 500s and timeouts, a final `failed` after the last
attempt, throttled batch progress, and no message sent twice by two dispatchers at once. The
receivers listen on loopback, which webhooks may reach only when it is allowed explicitly
(GENQ_WEBHOOK_ALLOW_NETWORKS; here the dispatchers' `policy`); without it nothing is sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from genq.services.egress import AddressPolicy
from genq.services.webhooks import Dispatcher, tenant_secret, validate_subscription
from genq.shared.db import Batch, Job, WebhookAttempt, WebhookDelivery, new_id, session_factory, session_scope
from genq.shared.migrate import upgrade
from genq.shared.webhooks import enqueue_job_event
from tests.support.processes import free_port
from tests.support.resolver import fake_resolver
from tests.support.servers import throwaway_database
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

LOOPBACK = AddressPolicy(allow=(IPv4Network("127.0.0.0/8"),))  # what the receivers need


# --- the receiver -----------------------------------------------------------------------------

def standard_webhooks_valid(secret: str, headers: Any, body: bytes, tolerance_s: int = 300) -> bool:
    """The receiver's own Standard Webhooks check, written from the spec, not from genq's code."""
    msg_id, stamp, sigs = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    if not (msg_id and stamp and sigs) or abs(time.time() - int(stamp)) > tolerance_s:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
    return any(hmac.compare_digest(s.split(",", 1)[1].encode(), mac) for s in sigs.split() if s.startswith("v1,"))


class Receiver:
    """A webhook endpoint on 127.0.0.1. It can fail the first N requests with 500, or hold the
    first N past the sender's timeout; it records every request and whether its signature held."""

    def __init__(self, secret: str, *, fail_first: int = 0, hang_first: int = 0, always_fail: bool = False,
                 delay_s: float = 0.0, redirect_to: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.secret, self.fail_first, self.hang_first = secret, fail_first, hang_first
        self.always_fail, self.delay_s, self.redirect_to = always_fail, delay_s, redirect_to
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    n = len(receiver.requests) + 1
                    receiver.requests.append({
                        "id": self.headers["webhook-id"], "valid": standard_webhooks_valid(
                            receiver.secret, self.headers, body),
                        "content_type": self.headers["content-type"], "user_agent": self.headers["user-agent"],
                        "host": self.headers["host"], "event": json.loads(body), "at": time.time()})
                if n <= receiver.hang_first:
                    receiver.release.wait(30)  # far past the sender's timeout; released at teardown
                elif receiver.delay_s:
                    time.sleep(receiver.delay_s)
                code = 500 if receiver.always_fail or n <= receiver.fail_first + receiver.hang_first else 204
                try:
                    self.send_response(307 if receiver.redirect_to else code)
                    if receiver.redirect_to:
                        self.send_header("location", receiver.redirect_to)
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up on us

            def log_message(self, *_args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def ids(self) -> list[str]:
        with self.lock:
            return [r["id"] for r in self.requests]


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def webhook_pg(pg_url: str) -> Iterator[str]:
    """A database of our own next to pg_url, so no API started by other tests dispatches our rows."""
    with throwaway_database(pg_url.rsplit("/", 1)[1] + "_webhooks") as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["postgres", "sqlite"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> sessionmaker[Session]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/t.db"
        upgrade(url)
        return session_factory(url)
    sessions = session_factory(request.getfixturevalue("webhook_pg"))
    with session_scope(sessions) as s:
        for table in (WebhookAttempt, WebhookDelivery, Job, Batch):
            s.execute(delete(table))
    return sessions


@pytest.fixture()
def secret(factory: sessionmaker[Session]) -> str:
    with session_scope(factory) as s:
        return tenant_secret(s, None)


@pytest.fixture()
def dispatchers() -> Iterator[list[Dispatcher]]:
    made: list[Dispatcher] = []
    yield made
    for d in made:
        d.stop()


def make(made: list[Dispatcher], factory: sessionmaker[Session], **kw: Any) -> Dispatcher:
    kw.setdefault("backoff_s", (0.05, 0.1))
    kw.setdefault("policy", LOOPBACK)
    d = Dispatcher(factory, poll_s=0.02, **kw)
    made.append(d)
    return d


def finished_job(factory: sessionmaker[Session], url: str, **kw: Any) -> str:
    """A job that just succeeded, with its job.completed event queued in the same transaction."""
    now = time.time()
    with session_scope(factory) as s:
        job = Job(id=new_id("job"), url="/v1/completions", model="echo", body={"model": "echo", "prompt": "hi"},
                  status="running", created_at=now, started_at=now, webhook_url=url, **kw)
        s.add(job)
        s.flush()
        job.status, job.finished_at, job.progress = "succeeded", time.time(), 1.0
        job.result = {"object": "text_completion", "choices": [{"text": "hi"}]}
        enqueue_job_event(s, job, "completed")
    return job.id


def delivery(factory: sessionmaker[Session], object_id: str) -> tuple[WebhookDelivery, list[WebhookAttempt]]:
    with session_scope(factory) as s:
        d = s.execute(select(WebhookDelivery).where(WebhookDelivery.object_id == object_id)).scalar_one()
        attempts = s.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id == d.id)
                             .order_by(WebhookAttempt.attempt)).scalars().all()
    return d, list(attempts)


def pump_until(d: Dispatcher, factory: sessionmaker[Session], object_id: str, status: str,
               timeout: float = 20) -> tuple[WebhookDelivery, list[WebhookAttempt]]:
    """Run the dispatcher by hand until the delivery reaches `status`."""
    def reached() -> tuple[WebhookDelivery, list[WebhookAttempt]] | None:
        d.run_once()
        row, attempts = delivery(factory, object_id)
        return (row, attempts) if row.status == status else None

    return wait_for(reached, timeout, 0.02, f"delivery {status}")


# --- tests ------------------------------------------------------------------------------------

def test_finished_job_sends_one_signed_event(factory: sessionmaker[Session], secret: str,
                                             dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret) as rx:
        job_id = finished_job(factory, rx.url)
        d = make(dispatchers, factory)
        assert d.run_once() == 1
        assert d.run_once() == 0  # delivered: nothing more to send
        assert len(rx.requests) == 1
        req = rx.requests[0]
        assert req["valid"], "signature did not verify"
        assert (req["content_type"], req["user_agent"]) == ("application/json", "genq-webhooks")
        event = req["event"]
        assert event["type"] == "job.completed" and event["timestamp"].endswith("Z")
        assert event["data"]["id"] == job_id and event["data"]["status"] == "succeeded"
        assert event["data"]["result"]["choices"][0]["text"] == "hi"
        row, attempts = delivery(factory, job_id)
        assert (row.status, row.attempts, req["id"]) == ("delivered", 1, row.id)
        assert row.delivered_at is not None and row.last_error is None
        assert [(a.attempt, a.status_code, a.error) for a in attempts] == [(1, 204, None)]


def test_retries_with_backoff_until_delivered(factory: sessionmaker[Session], secret: str,
                                              dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret, fail_first=2) as rx:
        job_id = finished_job(factory, rx.url)
        d = make(dispatchers, factory, backoff_s=(0.2, 0.4))
        row, attempts = pump_until(d, factory, job_id, "delivered")
        assert [a.status_code for a in attempts] == [500, 500, 204]
        assert attempts[1].at - attempts[0].at >= 0.2 and attempts[2].at - attempts[1].at >= 0.4
        assert row.attempts == 3 and row.last_error == "http_status"
        # Every try is the same message (same webhook-id), freshly signed; it succeeded once.
        assert rx.ids() == [row.id] * 3 and all(r["valid"] for r in rx.requests)


def test_timeout_counts_as_a_failure_and_is_retried(factory: sessionmaker[Session], secret: str,
                                                    dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret, hang_first=1) as rx:
        job_id = finished_job(factory, rx.url)
        d = make(dispatchers, factory, timeout_s=0.5)
        row, attempts = pump_until(d, factory, job_id, "delivered")
        assert attempts[0].status_code is None and attempts[0].error == "timeout"
        assert 0.4 < attempts[0].duration_s < 5
        assert [a.status_code for a in attempts[1:]] == [204]
        assert len(rx.requests) == 2


def test_permanent_failure_gives_up_after_the_last_attempt(factory: sessionmaker[Session], secret: str,
                                                           dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret, always_fail=True) as rx:
        job_id = finished_job(factory, rx.url)
        nobody = finished_job(factory, f"http://127.0.0.1:{free_port()}/closed")  # connection refused
        d = make(dispatchers, factory)
        row, attempts = pump_until(d, factory, job_id, "failed")
        assert [a.status_code for a in attempts] == [500, 500, 500]  # 1 + len(backoff_s)
        assert row.attempts == 3 and row.last_error == "http_status"
        dead, dead_attempts = pump_until(d, factory, nobody, "failed")
        assert len(dead_attempts) == 3 and all(a.status_code is None for a in dead_attempts)
        assert dead.last_error == "connection_failed"  # a category, not the socket's error text
        assert d.run_once() == 0 and len(rx.requests) == 3  # given up: no more tries


def test_batch_progress_is_throttled(factory: sessionmaker[Session], secret: str,
                                     dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret) as rx:
        now = time.time()
        batch_id = new_id("batch")
        with session_scope(factory) as s:
            s.add(Batch(id=batch_id, endpoint="/v1/completions", status="in_progress", total=4, created_at=now,
                        in_progress_at=now, webhook_url=rx.url, webhook_events=["progress", "completed"]))
            for i in range(4):
                s.add(Job(id=new_id("job"), batch_id=batch_id, seq=i, url="/v1/completions", model="echo",
                          body={}, status="queued", created_at=now))
        with session_scope(factory) as s:
            job_ids = s.execute(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.seq)).scalars().all()

        def set_status(job_id: str, status: str) -> None:
            with session_scope(factory) as s:
                s.get(Job, job_id).status = status  # type: ignore[union-attr]

        def progress_events() -> list[dict[str, Any]]:
            return [r["event"] for r in rx.requests if r["event"]["type"] == "batch.progress"]

        d = make(dispatchers, factory, progress_every_s=3600)
        d.run_once()
        assert [e["data"]["request_counts"]["queued"] for e in progress_events()] == [4]
        for job_id, status in [(job_ids[0], "running"), (job_ids[0], "succeeded"), (job_ids[1], "failed")]:
            set_status(job_id, status)  # counts change several times within one period
            d.run_once()
        assert len(progress_events()) == 1

        d.progress_every_s = 0  # the period is over: one event with the latest counts
        d.run_once()
        d.run_once()  # nothing changed since: nothing sent
        events = progress_events()
        assert len(events) == 2
        counts = events[1]["data"]["request_counts"]
        assert (counts["completed"], counts["failed"], counts["queued"]) == (1, 1, 2)
        assert all(r["valid"] for r in rx.requests) and events[1]["data"]["id"] == batch_id

        restarted = make(dispatchers, factory, progress_every_s=0)  # remembers what was sent
        restarted.run_once()
        assert len(progress_events()) == 2


def test_job_progress_is_throttled(factory: sessionmaker[Session], secret: str,
                                   dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret) as rx:
        now = time.time()
        job_id = new_id("job")
        with session_scope(factory) as s:
            s.add(Job(id=job_id, url="/v1/completions", model="echo", body={}, status="running", progress=0.1,
                      created_at=now, started_at=now, webhook_url=rx.url, webhook_events=["progress"]))

        def set_progress(p: float) -> None:
            with session_scope(factory) as s:
                s.get(Job, job_id).progress = p  # type: ignore[union-attr]

        d = make(dispatchers, factory, progress_every_s=3600)
        d.run_once()
        for p in (0.2, 0.3, 0.4):
            set_progress(p)
            d.run_once()
        d.progress_every_s = 0
        d.run_once()
        d.run_once()
        assert [(r["event"]["type"], r["event"]["data"]["progress"]) for r in rx.requests] == [
            ("job.progress", 0.1), ("job.progress", 0.4)]
        assert all(r["valid"] for r in rx.requests)


# --- no requests into genq's own network (SSRF) ---------------------------------------------------

def test_without_the_setting_nothing_is_sent_to_loopback_in_any_form(factory: sessionmaker[Session], secret: str,
                                                                      dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret) as rx:
        forms = [rx.url, f"http://localhost:{rx.port}/", f"http://2130706433:{rx.port}/", f"http://127.1:{rx.port}/",
                 f"http://[::ffff:127.0.0.1]:{rx.port}/", f"http://user:pw@127.0.0.1:{rx.port}/"]
        jobs = [finished_job(factory, url) for url in forms]  # queued directly: the delivery check alone
        d = make(dispatchers, factory, policy=AddressPolicy())  # the default: no networks allowed
        for job_id in jobs:
            row, attempts = pump_until(d, factory, job_id, "failed")
            assert row.last_error == "address_not_allowed", row.url
            assert [(a.status_code, a.error) for a in attempts] == [(None, "address_not_allowed")] * 3
        assert rx.requests == []


def test_closed_ports_and_internal_services_all_answer_the_same(tmp_path: Path, redis_url: str, pg_url: str,
                                                                dispatchers: list[Dispatcher],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The tenant cannot scan genq's network through the delivery log: a closed port, Redis and
    Postgres all show `connection_failed` (the raw error goes to the log), and with the default
    policy all show `address_not_allowed`."""
    url = f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    factory = session_factory(url)
    where = {name: urlsplit(u) for name, u in (("redis", redis_url), ("postgres", pg_url))}
    targets = {"closed": f"127.0.0.1:{free_port()}", **{n: f"{u.hostname}:{u.port}" for n, u in where.items()}}
    for policy, expected in ((LOOPBACK, "connection_failed"), (AddressPolicy(), "address_not_allowed")):
        jobs = {name: finished_job(factory, f"http://{hostport}/hook") for name, hostport in targets.items()}
        d = make(dispatchers, factory, policy=policy, backoff_s=())
        with caplog.at_level("INFO", logger="genq.webhooks"):
            shown = {name: pump_until(d, factory, job_id, "failed")[0].last_error for name, job_id in jobs.items()}
        assert shown == dict.fromkeys(targets, expected)
    assert any("ConnectError" in r.getMessage() for r in caplog.records)  # the detail, for the operator


def test_a_name_that_rebinds_to_loopback_after_submit_is_refused(factory: sessionmaker[Session], secret: str,
                                                                 dispatchers: list[Dispatcher],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([["93.184.216.34"]])  # public when the job is submitted, loopback ever after
    fake_resolver(monkeypatch, {"rebind.example": lambda: next(answers, ["127.0.0.1"])})
    with Receiver(secret) as rx:
        url = f"http://rebind.example:{rx.port}/hook"
        assert validate_subscription(url, None) == (url, None)
        job_id = finished_job(factory, url)
        row, _ = pump_until(make(dispatchers, factory, policy=AddressPolicy()), factory, job_id, "failed")
        assert row.last_error == "address_not_allowed" and rx.requests == []


def test_the_connection_goes_to_the_checked_address_under_the_urls_host(
        factory: sessionmaker[Session], secret: str, dispatchers: list[Dispatcher],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The host is resolved once per connection and the socket opened to that checked address: a
    second lookup would answer 127.0.0.2, where nothing listens and which is not allowed."""
    answers = iter([["127.0.0.1"]])
    asked = fake_resolver(monkeypatch, {"hook.example": lambda: next(answers, ["127.0.0.2"])})
    with Receiver(secret) as rx:
        job_id = finished_job(factory, f"http://hook.example:{rx.port}/hook")
        d = make(dispatchers, factory, policy=AddressPolicy(allow=(IPv4Network("127.0.0.1/32"),)))
        row, _ = pump_until(d, factory, job_id, "delivered")
        assert asked == ["hook.example"]
        assert [(r["host"], r["valid"]) for r in rx.requests] == [(f"hook.example:{rx.port}", True)]


def test_redirects_are_not_followed(factory: sessionmaker[Session], secret: str,
                                    dispatchers: list[Dispatcher]) -> None:
    with Receiver(secret) as inside, Receiver(secret, redirect_to=inside.url) as rx:
        job_id = finished_job(factory, rx.url)
        row, attempts = pump_until(make(dispatchers, factory), factory, job_id, "failed")
        assert [(a.status_code, a.error) for a in attempts] == [(307, "http_status")] * 3
        assert len(rx.requests) == 3 and inside.requests == []


@pytest.mark.parametrize("cert_for", ["hook.example", "other.example"])
def test_https_checks_the_certificate_and_sends_sni_for_the_urls_host(
        cert_for: str, factory: sessionmaker[Session], secret: str, dispatchers: list[Dispatcher],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Connecting to the checked address keeps TLS on the URL's hostname: the server sees
    hook.example as SNI, and a certificate for another name is refused."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(cert_for).configure_cert(server_tls)
    sni: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value]
    fake_resolver(monkeypatch, {"hook.example": ["127.0.0.1"]})
    with Receiver(secret, tls=server_tls) as rx:
        job_id = finished_job(factory, f"https://hook.example:{rx.port}/hook")
        d = make(dispatchers, factory, policy=AddressPolicy(allow=(IPv4Network("127.0.0.1/32"),)), backoff_s=())
        if cert_for == "hook.example":
            pump_until(d, factory, job_id, "delivered")
            assert [(r["host"], r["valid"]) for r in rx.requests] == [(f"hook.example:{rx.port}", True)]
        else:
            row, _ = pump_until(d, factory, job_id, "failed")
            assert row.last_error == "connection_failed" and rx.requests == []
        assert sni and set(sni) == {"hook.example"}


def test_parallel_dispatchers_never_send_a_message_twice(webhook_pg: str, dispatchers: list[Dispatcher]) -> None:
    factory = session_factory(webhook_pg)
    with session_scope(factory) as s:
        for table in (WebhookAttempt, WebhookDelivery, Job, Batch):
            s.execute(delete(table))
        secret = tenant_secret(s, None)
    with Receiver(secret) as rx:
        jobs = [finished_job(factory, rx.url) for _ in range(200)]
        for _ in range(4):  # small pages, so the dispatchers keep claiming at the same moments
            make(dispatchers, factory, batch_size=10, concurrency=4).start()

        def all_delivered() -> bool:
            with session_scope(factory) as s:
                return not s.execute(select(WebhookDelivery.id).where(
                    WebhookDelivery.status != "delivered")).first()

        wait_for(all_delivered, 60, 0.05, f"{len(jobs)} deliveries")
        seen = Counter(rx.ids())
        assert len(seen) == len(jobs) and set(seen.values()) == {1}, seen.most_common(3)
        assert all(r["valid"] for r in rx.requests)
        with session_scope(factory) as s:
            assert len(s.execute(select(WebhookAttempt.id)).all()) == len(jobs)


# --- end to end through the running API and workers ----------------------------------------------

def test_api_batch_and_job_webhooks_end_to_end(stack: Any) -> None:
    """A batch and a single job submitted over HTTP with webhooks: the workers' outcomes come back
    as signed events from the API's dispatcher, verified with the secret the API hands out."""
    with stack.client() as c:
        secret = c.get("/v1/webhooks/secret").json()["secret"]
        assert secret.startswith("whsec_")
        with Receiver(secret) as rx:
            lines = [{"custom_id": f"w{i}", "url": "/v1/completions", "body": {"model": "echo", "prompt": "x"}}
                     for i in range(3)]
            batch = c.post("/v1/batches", json={"requests": lines, "webhook_url": rx.url,
                                                "webhook_events": ["completed", "progress"]}).json()
            job = c.post("/v1/jobs", json={"url": "/v1/images/generations", "webhook_url": rx.url,
                                           "body": {"model": "tiny-gan", "prompt": "no such label", "size": "32x32"}})
            assert job.status_code == 202, job.text

            def types() -> list[str]:
                return [r["event"]["type"] for r in rx.requests]

            wait_for(lambda: "batch.completed" in types() and "job.failed" in types(), 60, 0.1, "webhooks")
            assert all(r["valid"] for r in rx.requests)
            done = next(r["event"] for r in rx.requests if r["event"]["type"] == "batch.completed")
            assert done["data"]["id"] == batch["id"] and done["data"]["request_counts"]["completed"] == 3
            failed = next(r["event"] for r in rx.requests if r["event"]["type"] == "job.failed")
            assert failed["data"]["id"] == job.json()["id"] and failed["data"]["error"]["param"] == "body.prompt"
            log = c.get("/v1/webhooks/deliveries", params={"object_id": batch["id"]}).json()["data"]
            assert {d["status"] for d in log if d["type"] == "batch.completed"} == {"delivered"}
        # Loopback is allowed in this stack (GENQ_WEBHOOK_ALLOW_NETWORKS); the metadata service is not.
        metadata = c.post("/v1/jobs", json={**lines[0], "webhook_url": "http://169.254.169.254/latest/meta-data/"})
        assert metadata.status_code == 400 and metadata.json()["error"]["param"] == "webhook_url"
        bad = c.post("/v1/batches", json={"requests": lines, "webhook_url": "ftp://nope"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "webhook_url"
        bad_events = c.post("/v1/jobs", json={**lines[0], "webhook_url": rx.url, "webhook_events": ["exploded"]})
        assert bad_events.status_code == 400 and bad_events.json()["error"]["param"] == "webhook_url"
