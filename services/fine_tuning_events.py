"""A fine-tuning job's events as Server-Sent Events (`GET .../events?stream=true`): what the job
has logged so far, oldest first, then each new event as its worker writes it, until the job ends.
Read from the database, so any API replica serves it.

    event: fine_tuning.job.event   id: the event's sequence number   data: the event object
    event: fine_tuning.job         data: the job object, once it has ended
    event: done                    data: {"id", "status"}
    : keepalive                    (a comment every ~15 s)

A reconnect with `Last-Event-ID` continues after that event. OpenAI's API once served fine-tune
events the same way (`stream=true`); its current API lists them only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent

from genq.services.sse import POLL_S, SEP, event_stream
from genq.shared.db import FineTuningEvent, FineTuningJob
from genq.shared.fine_tuning_jobs import TERMINAL
from genq.shared.views import fine_tuning_event_object, fine_tuning_job_object

PAGE = 500  # events read per poll


@dataclass
class EventFollower:
    """Successive polls of one job's events; `poll` does blocking database work (run it in a thread)."""

    sessions: sessionmaker[Session]
    job_id: str
    after_seq: int = 0

    def poll(self) -> tuple[list[ServerSentEvent], bool]:
        with self.sessions() as session:
            job = session.get(FineTuningJob, self.job_id)
            if job is None:
                return [_frame("done", {"id": self.job_id, "status": None})], True
            # The status first: once it reads terminal, the job's last events are committed too.
            ended = job.status in TERMINAL
            rows = session.execute(select(FineTuningEvent).where(FineTuningEvent.job_id == self.job_id,
                                                                 FineTuningEvent.seq > self.after_seq)
                                   .order_by(FineTuningEvent.seq).limit(PAGE)).scalars().all()
            frames = [_frame("fine_tuning.job.event", fine_tuning_event_object(e), e.seq) for e in rows]
            if rows:
                self.after_seq = rows[-1].seq
            if ended and len(rows) < PAGE:
                frames += [_frame("fine_tuning.job", fine_tuning_job_object(job)),
                           _frame("done", {"id": job.id, "status": job.status})]
                return frames, True
        return frames, False


def _frame(name: str, data: dict[str, Any], event_id: int | None = None) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(data, separators=(",", ":")), event=name,
                           id=None if event_id is None else str(event_id), sep=SEP)


async def _stream(follower: EventFollower) -> AsyncIterator[ServerSentEvent]:
    while True:
        frames, ended = await anyio.to_thread.run_sync(follower.poll)
        for frame in frames:
            yield frame
        if ended:
            return
        if not frames:
            await anyio.sleep(POLL_S)


def follow_events(sessions: sessionmaker[Session], job_id: str, after_seq: int) -> EventSourceResponse:
    return event_stream(_stream(EventFollower(sessions, job_id, after_seq)))
