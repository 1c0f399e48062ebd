"""`stream: true` on the synchronous text endpoints: the job's text as Server-Sent Events in
OpenAI's chunk format, as the worker makes it.

The request is a job like any other (its row, queue, priority, tenant and cancel). The answer
waits for a worker to take it; a job that fails before any text is answered with the usual JSON
error. Then chunks follow: the pieces the worker streams (genq.shared.streams), and when the job
ends, whatever of each choice's final text was not streamed yet, its `finish_reason` and, where
asked, its logprobs and the usage; then `data: [DONE]`. So the chunks of a choice always add up to
the job's stored result. A client that disconnects cancels the job.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from genq.services import jobs as jobs_data
from genq.services.errors import error_body
from genq.services.state import AppState
from genq.shared.chat import CHAT_URL
from genq.shared.db import Job, session_scope
from genq.shared.errors import job_failure
from genq.shared.results import ResultRenderer, requested_model
from genq.shared.schemas import TERMINAL_JOB_STATUSES, response_id
from genq.shared.streams import Delta, RedisTokenSource, streams_on

POLL_S = 0.25  # how often the job's status is read while its text streams


class ChunkWriter:
    """OpenAI's streamed chunks for one job: `chat.completion.chunk` or `text_completion`."""

    def __init__(self, job: Job, fingerprint: str, choices: int, include_usage: bool,
                 echoed: list[str] | None = None) -> None:
        self.chat = job.url == CHAT_URL
        suffix = job.id.removeprefix("job_")
        self.base = {"id": response_id("chatcmpl" if self.chat else "cmpl", suffix),
                     "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(job.created_at), "model": requested_model(job),
                     "system_fingerprint": fingerprint}
        self.choices, self.include_usage = choices, include_usage
        self.echoed = echoed or []  # a completion with `echo`: each choice's text starts with its prompt

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {**self.base, "choices": choices, **extra}
        if self.include_usage and "usage" not in chunk:
            chunk["usage"] = None  # OpenAI: every chunk has usage null, the last one the totals
        return json.dumps(chunk, separators=(",", ":"))

    def _choice(self, index: int, text: str | None, finish: str | None = None, logprobs: Any = None,
                role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"text": text or "", "index": index, "logprobs": logprobs, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def opening(self) -> list[str]:
        """Chat streams start with each choice's role; echoing completions with each prompt."""
        if self.chat:
            return [self._chunk([self._choice(i, "", role=True)]) for i in range(self.choices)]
        return [self._chunk([self._choice(i, prompt)]) for i, prompt in enumerate(self.echoed)]

    def piece(self, delta: Delta) -> str:
        return self._chunk([self._choice(delta.choice, delta.text)])

    def ending(self, result: dict[str, Any], sent: dict[int, str]) -> list[str] | None:
        """The rest of each choice, its finish_reason and logprobs, then usage; None when the
        result does not continue what was streamed (a retried job whose new attempt differs)."""
        out = []
        for choice in result["choices"]:
            i = choice["index"]
            text = choice["message"]["content"] if self.chat else choice["text"]
            streamed = sent.get(i, "")
            if not (text or "").startswith(streamed):
                return None
            rest = (text or "")[len(streamed):]
            if rest:
                out.append(self._chunk([self._choice(i, rest)]))
            out.append(self._chunk([self._choice(i, None if self.chat else "", choice["finish_reason"],
                                                 choice.get("logprobs"))]))
        if self.include_usage:
            out.append(self._chunk([], usage=result["usage"]))
        return out


def read_job(state: AppState, job_id: str) -> Job:
    """The job as it is now, read in a short session of its own and detached from it."""
    with session_scope(state.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def cancel(state: AppState, job_id: str) -> bool:
    """Cancel a queued or running job in a short session of its own; whether it was cancelled now."""
    with session_scope(state.sessions) as session:
        return jobs_data.cancel_job(session, job_id)


def _job_error(job: Job) -> dict[str, Any]:
    """The error event of a job that failed or was cancelled while streaming (as its batch output
    line or synchronous answer would say)."""
    if job.status == "cancelled":
        return error_body(409, f"job {job.id} was cancelled", "cancelled", job_id=job.id)
    _, failure = job_failure(job.error)
    return {"error": {**failure, "job_id": job.id}}


async def event_stream(state: AppState, renderer: ResultRenderer, job: Job, writer: ChunkWriter,
                       deadline: float) -> AsyncIterator[str]:
    """The chunks of a running (or just ended) job, ending with [DONE] or an error event."""
    source = RedisTokenSource(state.settings.broker_url) if streams_on(state.settings.broker_url) else None
    sent: dict[int, str] = dict(enumerate(writer.echoed))
    attempt: int | None = None
    after, finished = "0", False
    try:
        for chunk in writer.opening():
            yield chunk
        while True:
            ended = job.status in TERMINAL_JOB_STATUSES
            # Read what the worker streamed; once the job has ended, one last read takes the rest.
            deltas: list[Delta] = []
            if source is not None:
                after, deltas = await source.read(job.id, after, 0 if ended else int(POLL_S * 1000))
            elif not ended:
                await asyncio.sleep(POLL_S)
            for delta in deltas:
                attempt = delta.attempt if attempt is None else attempt
                if delta.attempt == attempt:  # a lost attempt's text cannot be taken back: keep to the first
                    sent[delta.choice] = sent.get(delta.choice, "") + delta.text
                    yield writer.piece(delta)
            if ended and not deltas:
                break
            if not ended:
                job = await run_in_threadpool(read_job, state, job.id)
                if time.monotonic() > deadline and job.status not in TERMINAL_JOB_STATUSES:
                    yield json.dumps(error_body(504, f"job {job.id} did not end within the timeout; follow it "
                                                f"at /v1/jobs/{job.id}", "timeout", job_id=job.id))
                    finished = True
                    return
        finished = True
        if job.status != "succeeded":
            yield json.dumps(_job_error(job))
            return
        ending = writer.ending(renderer.render(job) or {}, sent)
        if ending is None:
            yield json.dumps(error_body(500, f"job {job.id} was retried after its worker was lost and its new "
                                        "answer differs from what was streamed; read the job for it",
                                        "runtime_error", job_id=job.id))
            return
        for chunk in ending:
            yield chunk
        yield "[DONE]"
    finally:  # shielded: when the client goes away this runs inside a cancelled scope
        with anyio.CancelScope(shield=True):
            if not finished:  # the client went away: nobody reads the answer, so stop making it
                await run_in_threadpool(cancel, state, job.id)
            if source is not None:
                await source.close()


async def first_text(state: AppState, job: Job, deadline: float) -> Job:
    """Wait until a running job has streamed its first piece or has ended (on a SQL broker, until
    it ends), so that a request the worker refuses (a prompt over the context, say) is answered
    with its plain JSON error rather than an event stream that holds only the error."""
    source = RedisTokenSource(state.settings.broker_url) if streams_on(state.settings.broker_url) else None
    try:
        while job.status not in TERMINAL_JOB_STATUSES and time.monotonic() < deadline:
            if source is not None and await source.started(job.id, int(POLL_S * 1000)):
                break
            if source is None:
                await asyncio.sleep(POLL_S)
            job = await run_in_threadpool(read_job, state, job.id)
        return job
    finally:
        if source is not None:
            await source.close()


def stream_response(state: AppState, renderer: ResultRenderer, job: Job, writer: ChunkWriter,
                    deadline: float) -> EventSourceResponse:
    return EventSourceResponse(event_stream(state, renderer, job, writer, deadline), ping=15, sep="\n")
