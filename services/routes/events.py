"""Batch progress as Server-Sent Events: a snapshot, live counts and per-job transitions until the
batch ends, read from the results database (the source of truth), so every API replica can serve it.

Stream (each event has an increasing integer `id:`; a reconnect with `Last-Event-ID` continues the
numbering and starts again with a snapshot):

    event: batch   data: the batch object (first and last event)
    event: counts  data: {"status", "request_counts"} whenever either changes
    event: job     data: {"id", "custom_id", "status", "error"} when a job starts or ends
    event: done    data: {"id", "status"}
    : keepalive    (a comment every ~15 s, sse-starlette's ping)

sse-starlette's EventSourceResponse writes the frames, sends the keepalive pings from a task of its
own (so they go out even while a poll is slow) and ends the stream when the client disconnects or
the server shuts down.

The first poll replays the current status of every job that has started or ended, so a client that
connects late (or to an ended batch: batch, job..., batch, done) still sees each job; later polls
look only at jobs whose times moved.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent

from genq.services.body import refuse_nul_params
from genq.services.deps import StateDep, TenantDep
from genq.services.routes.batches import load_batch
from genq.services.sse import POLL_S, SEP, event_stream, last_event_id
from genq.shared import jobs as jobs_data
from genq.shared.db import Batch, Job
from genq.shared.schemas import TERMINAL_BATCH_STATUSES
from genq.shared.views import batch_object

router = APIRouter(tags=["batches"], dependencies=[Depends(refuse_nul_params)])

# Job times come from the workers' clocks and are committed a moment after they are taken, so each
# poll looks this far behind the newest time it has seen; (id, status) pairs already sent are skipped.
OVERLAP_S = 5.0

Event = tuple[str, dict[str, Any]]


def _batch_view(session: Session, batch: Batch) -> dict[str, Any]:
    return batch_object(batch, jobs_data.request_counts(jobs_data.batch_counts(session, batch.id)))


@dataclass
class BatchFollower:
    """Turns successive polls of one batch into the events that describe what changed. `poll` does
    blocking database work in its own session; run it in a worker thread."""

    sessions: sessionmaker[Session]
    batch_id: str
    status: str
    counts: dict[str, int]
    watermark: float | None = None  # newest job time seen; None until the first poll
    sent: set[tuple[str, str]] = field(default_factory=set)

    def _job_events(self, session: Session) -> list[Event]:
        q = select(Job.id, Job.custom_id, Job.status, Job.error, Job.started_at, Job.finished_at).where(
            Job.batch_id == self.batch_id)
        if self.watermark is None:
            q = q.where(or_(Job.started_at.is_not(None), Job.finished_at.is_not(None)))
        else:
            since = self.watermark - OVERLAP_S
            q = q.where(or_(Job.started_at > since, Job.finished_at > since))
        events: list[Event] = []
        newest = self.watermark or 0.0
        for job_id, custom_id, status, error, started_at, finished_at in session.execute(q.order_by(Job.seq)):
            newest = max(newest, started_at or 0.0, finished_at or 0.0)
            if (job_id, status) in self.sent:
                continue
            self.sent.add((job_id, status))
            events.append(("job", {"id": job_id, "custom_id": custom_id, "status": status, "error": error}))
        self.watermark = newest
        return events

    def poll(self) -> tuple[list[Event], bool]:
        """The events since the previous poll, and whether the batch has ended (its final events
        included)."""
        with self.sessions() as session:
            batch = session.get(Batch, self.batch_id)
            if batch is None:  # gone (never happens today); end the stream rather than spin
                return [("done", {"id": self.batch_id, "status": None})], True
            # Status first: once it reads terminal, every job has ended before the queries below.
            ended = batch.status in TERMINAL_BATCH_STATUSES
            events = self._job_events(session)
            view = _batch_view(session, batch)
        if (view["status"], view["request_counts"]) != (self.status, self.counts):
            self.status, self.counts = view["status"], view["request_counts"]
            events.append(("counts", {"status": self.status, "request_counts": self.counts}))
        if ended:
            events += [("batch", view), ("done", {"id": self.batch_id, "status": view["status"]})]
        return events, ended


async def _stream(follower: BatchFollower, first: dict[str, Any], last_id: int) -> AsyncIterator[ServerSentEvent]:
    event_id = last_id

    def frame(name: str, data: dict[str, Any]) -> ServerSentEvent:
        nonlocal event_id
        event_id += 1
        # json.dumps never emits a newline, so one `data:` line carries the whole object.
        return ServerSentEvent(json.dumps(data, separators=(",", ":")), event=name, id=str(event_id), sep=SEP)

    yield frame("batch", first)
    while True:
        events, ended = await anyio.to_thread.run_sync(follower.poll)
        for name, data in events:
            yield frame(name, data)
        if ended:
            return
        await anyio.sleep(POLL_S)


@router.get("/v1/batches/{batch_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-Sent Events until the batch ends"}})
async def batch_events(batch_id: str, request: Request, state: StateDep, tenant: TenantDep) -> EventSourceResponse:
    """Follow a batch live: a snapshot, then counts and job transitions, until it is terminal."""

    def _load() -> dict[str, Any]:
        # A session of our own, closed before streaming: a stream may last hours and must not
        # hold a pooled connection in between polls.
        with state.sessions() as session:
            return _batch_view(session, load_batch(session, batch_id, tenant))

    first = await run_in_threadpool(_load)
    follower = BatchFollower(state.sessions, batch_id, first["status"], first["request_counts"])
    # The library watches for the client leaving (and for shutdown) and then cancels the stream.
    return event_stream(_stream(follower, first, last_event_id(request)))
