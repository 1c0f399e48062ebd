"""Batch events over Server-Sent Events: GET /v1/batches/{id}/events, and the client that reads it.

The integration tests serve an in-process app (create_app plus the events router) with uvicorn on a
free port, against the stack's Postgres, Redis and S3, while the stack's real workers run the jobs;
the parser and client tests run on canned bytes and need no services."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from genq.client import Client, EventStreamError
from genq.sse import ServerEvent, iter_events
from tests.support.processes import Stack, free_port

# --- the parser and the client, on canned streams ------------------------------------------------
from tests.support.waiting import wait_for

# --- the parser and the client, on canned streams ------------------------------------------------

def test_parser_handles_fields_comments_multiline_data_and_split_line_breaks() -> None:
    raw = (b": hello\r\n"
           b"retry: 1500\r\n"
           b"id: 1\r\nevent: batch\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
           b"data:no space\n\n"  # no event name: "message"; a missing space after the colon is fine
           b"id: 2\revent: counts\rdata: {}\r\r"  # bare CR line breaks
           b"event: ignored\n\n"  # no data: nothing is dispatched, and the name does not leak on
           b"data\n\n"  # a field with no colon: empty data, still an event
           b"id: 3\nevent: done\ndata: {\"status\": \"completed\"}\n\n"
           b"id: 4\nevent: partial\ndata: never ended")
    # Deliver it in 3-byte chunks so CRLF pairs and fields straddle chunk boundaries.
    chunks = [raw[i:i + 3] for i in range(0, len(raw), 3)]
    events = list(iter_events(chunks, comments=True))
    assert events == [
        ServerEvent("", "hello", None, None),
        ServerEvent("batch", '{"a":\n1}', "1", 1500),
        ServerEvent("message", "no space", "1", 1500),
        ServerEvent("counts", "{}", "2", 1500),
        ServerEvent("message", "", "2", 1500),
        ServerEvent("done", '{"status": "completed"}', "3", 1500),
    ]
    assert json.loads(events[1].data) == {"a": 1}
    assert [e.event for e in iter_events(chunks)][:2] == ["batch", "message"]  # comments off by default


def _frame(event_id: int, name: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _batch(status: str, done: int, total: int = 2) -> dict[str, Any]:
    return {"id": "batch_x", "status": status,
            "request_counts": {"total": total, "completed": done, "failed": 0, "cancelled": 0}}


def _client(handler: Any) -> Client:
    client = Client("http://genq.test")
    client.http = httpx.Client(base_url="http://genq.test", transport=httpx.MockTransport(handler))
    return client


def test_client_resumes_a_dropped_stream_with_last_event_id_and_skips_repeated_jobs() -> None:
    seen_ids: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_ids.append(request.headers.get("last-event-id"))
        job = {"id": "job_1", "custom_id": "a", "status": "succeeded", "error": None}
        if len(seen_ids) == 1:  # the first connection drops after two events, without `done`
            body = _frame(1, "batch", _batch("in_progress", 0)) + _frame(2, "job", job)
        else:
            body = (_frame(3, "batch", _batch("in_progress", 1)) + _frame(4, "job", job)
                    + _frame(5, "job", {**job, "id": "job_2", "custom_id": "b"})
                    + _frame(6, "batch", _batch("completed", 2)) + _frame(7, "done", {"status": "completed"}))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    events = list(_client(handler).events("batch_x"))
    assert seen_ids == [None, "2"]
    assert [(e, d.get("id")) for e, d in events if e == "job"] == [("job", "job_1"), ("job", "job_2")]
    assert [e for e, _ in events] == ["batch", "job", "batch", "job", "batch", "done"]


def test_client_gives_up_after_its_retries() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b": nothing yet\n\n", headers={"content-type": "text/event-stream"})

    with pytest.raises(EventStreamError, match="ended before"):
        list(_client(handler).events("batch_x", retries=1))


def test_wait_batch_polls_when_the_server_has_no_event_stream() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/events"):  # an older server: FastAPI's plain 404
            return httpx.Response(404, json={"detail": "Not Found"})
        gets = sum(p == "/v1/batches/batch_x" for p in calls)
        return httpx.Response(200, json=_batch("completed" if gets >= 3 else "in_progress", min(gets - 1, 2)))

    final = _client(handler).wait_batch("batch_x", progress=True, poll_s=0.01)
    assert final["status"] == "completed"
    assert calls[:2] == ["/v1/batches/batch_x", "/v1/batches/batch_x/events"]
    assert calls.count("/v1/batches/batch_x") >= 3


def test_wait_batch_follows_the_stream_to_the_final_batch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/events"):
            return httpx.Response(200, json=_batch("in_progress", 0))
        body = (_frame(1, "batch", _batch("in_progress", 0)) + b": keepalive\n\n"
                + _frame(2, "counts", {"status": "in_progress", "request_counts": _batch("", 1)["request_counts"]})
                + _frame(3, "batch", _batch("completed", 2)) + _frame(4, "done", {"status": "completed"}))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    assert _client(handler).wait_batch("batch_x", progress=True) == _batch("completed", 2)


# --- the endpoint, over real HTTP, with the stack's workers -------------------------------------

@pytest.fixture(scope="module")
def events_api(stack: Stack, stack_env: dict[str, str]) -> Iterator[str]:
    """The API with the events router, served in this process (the stack's API may predate it)."""
    import uvicorn

    from genq.services.app import create_app
    from genq.services.routes import events as routes_events
    from genq.shared.config import build_settings

    settings = build_settings(**{k.removeprefix("GENQ_").lower(): v for k, v in stack_env.items()
                                 if k.startswith("GENQ_")})
    app = create_app(settings, migrate=False)  # the stack's API has migrated the database
    if not any(getattr(r, "path", "") == "/v1/batches/{batch_id}/events" for r in app.routes):
        app.include_router(routes_events.router)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, 0.05, "in-process API")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def paced_worker(stack: Stack) -> None:
    """A worker for `paced-echo` (0.3 s a job), slow enough for a stream to watch a batch progress."""
    proc = stack.start_worker("paced-echo", name="worker-paced-echo")
    stack.wait_worker_ready(proc, "worker-paced-echo")


def _submit(base: str, model: str, n: int, tag: str) -> dict[str, Any]:
    lines = [{"custom_id": f"{tag}-{i}", "url": "/v1/completions", "body": {"model": model, "prompt": f"{tag} {i}"}}
             for i in range(n)]
    resp = httpx.post(f"{base}/v1/batches", json={"requests": lines}, timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _read_raw(base: str, batch_id: str, timeout: float = 120) -> tuple[httpx.Response, list[ServerEvent]]:
    with httpx.stream("GET", f"{base}/v1/batches/{batch_id}/events", timeout=timeout) as resp:
        return resp, list(iter_events(resp.iter_bytes()))


@pytest.mark.integration
@pytest.mark.parametrize("model", ["echo", "paced-echo"])
def test_stream_follows_a_batch_to_completed(events_api: str, paced_worker: None, model: str) -> None:
    batch = _submit(events_api, model, 10, f"sse-{model}")
    resp, events = _read_raw(events_api, batch["id"])

    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    ids = [int(e.id or 0) for e in events]
    assert ids == list(range(1, len(events) + 1))  # every event numbered, increasing
    names = [e.event for e in events]
    assert names[0] == "batch" and names[-2:] == ["batch", "done"]
    assert set(names) <= {"batch", "counts", "job", "done"}
    data = [json.loads(e.data) for e in events]
    assert data[0]["id"] == batch["id"] and data[0]["request_counts"]["total"] == 10
    final = data[-2]
    assert final["status"] == "completed" and final["request_counts"]["completed"] == 10
    assert final["output_file_id"] and final["completed_at"]
    assert data[-1] == {"id": batch["id"], "status": "completed"}

    counts = [d for n, d in zip(names, data, strict=True) if n == "counts"]
    completed = [c["request_counts"]["completed"] for c in counts]
    if counts:
        assert completed == sorted(completed) and completed[-1] == 10
        assert counts[-1]["status"] == "completed"
    else:  # instant jobs on a slow machine: the batch had ended by the first snapshot, nothing changed after
        assert model == "echo" and data[0]["status"] == "completed"

    jobs = [d for n, d in zip(names, data, strict=True) if n == "job"]
    listed = httpx.get(f"{events_api}/v1/batches/{batch['id']}/jobs", params={"limit": 100}).json()["data"]
    succeeded = [j["id"] for j in jobs if j["status"] == "succeeded"]
    assert sorted(succeeded) == sorted(j["id"] for j in listed)  # each job succeeded exactly once
    assert {j["custom_id"] for j in jobs} == {f"sse-{model}-{i}" for i in range(10)}
    assert all(j["error"] is None for j in jobs)
    assert len(jobs) == len({(j["id"], j["status"]) for j in jobs})  # no repeats
    if model == "paced-echo":  # 3 s of work: the stream watched it live, not only the outcome
        assert len(set(completed)) >= 2 and any(j["status"] == "running" for j in jobs)


@pytest.mark.integration
def test_stream_ends_cancelled_with_keepalives_while_idle(events_api: str, stack: Stack,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from genq.services import sse

    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.6)  # the app runs in this process
    batch = _submit(events_api, "tiny-gpt2-idle", 4, "sse-cancel")  # no worker serves this model
    client = Client(events_api)
    events: list[tuple[str, dict[str, Any]]] = []
    stream = client.events(batch["id"], keepalives=True)
    for event, data in stream:
        events.append((event, data))
        if event == "keepalive":  # the batch sits queued: only keepalives until we cancel it
            assert [e for e, _ in events] == ["batch", "keepalive"]
            assert client.cancel(batch["id"])["status"] in ("cancelling", "cancelled")
            break
    events = [x for x in [*events, *stream] if x[0] != "keepalive"]

    names = [e for e, _ in events]
    assert names[0] == "batch" and names[-2:] == ["batch", "done"]
    final = events[-2][1]
    assert final["status"] == "cancelled" and final["cancelled_at"]
    assert final["request_counts"]["cancelled"] == 4 and final["request_counts"]["queued"] == 0
    jobs = [d for e, d in events if e == "job"]
    assert sorted(j["custom_id"] for j in jobs) == [f"sse-cancel-{i}" for i in range(4)]
    assert all(j["status"] == "cancelled" and j["error"]["code"] == "batch_cancelled" for j in jobs)
    assert events[-1][1] == {"id": batch["id"], "status": "cancelled"}

    # An ended batch streams its outcome at once: snapshot, each job's final status, batch, done.
    again = [e for e, _ in client.events(batch["id"])]
    assert again == ["batch", *["job"] * 4, "batch", "done"]


@pytest.mark.integration
def test_stream_stops_when_the_client_goes_away(events_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from genq.services.routes import events as routes_events

    ended = threading.Event()
    stream = routes_events._stream

    async def tracked(*args: Any) -> Any:
        try:
            async for chunk in stream(*args):
                yield chunk
        finally:
            ended.set()

    monkeypatch.setattr(routes_events, "_stream", tracked)
    batch = _submit(events_api, "tiny-gpt2-idle", 1, "sse-gone")  # never ends on its own
    with httpx.stream("GET", f"{events_api}/v1/batches/{batch['id']}/events", timeout=30) as resp:
        first = next(iter_events(resp.iter_bytes()))
        assert first.event == "batch" and not ended.is_set()
    wait_for(ended.is_set, 10, 0.05, "the server to end the stream of a client that left")
    httpx.post(f"{events_api}/v1/batches/{batch['id']}/cancel")


@pytest.mark.integration
def test_stream_of_an_unknown_batch_is_404(events_api: str) -> None:
    resp = httpx.get(f"{events_api}/v1/batches/batch_nope/events")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


@pytest.mark.integration
def test_wait_batch_with_progress_reads_the_stream(events_api: str, paced_worker: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    batch = _submit(events_api, "paced-echo", 4, "sse-wait")
    client = Client(events_api)
    calls: list[str] = []
    client.http.event_hooks["request"].append(lambda r: calls.append(r.url.path))
    final = client.wait_batch(batch["id"], progress=True, timeout_s=120)
    assert final["status"] == "completed" and final["request_counts"]["completed"] == 4
    # One read of the batch, then the stream; no polling.
    assert calls == [f"/v1/batches/{batch['id']}", f"/v1/batches/{batch['id']}/events"]
    assert "4/4" in capsys.readouterr().err  # the bar reached the end
