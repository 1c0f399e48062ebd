"""What genq's Server-Sent Event streams share (batch progress, fine-tuning events): frame
separators, the poll and keepalive intervals, `Last-Event-ID`, and the response that sends them.
sse-starlette writes the frames, sends the keepalive pings from a task of its own (so they go out
even while a poll is slow) and ends the stream when the client leaves or the server shuts down."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

POLL_S = 0.5  # how often a stream reads the database while nothing is new
KEEPALIVE_S = 15.0  # the ping interval, read when each stream starts
SEP = "\n"  # each event carries its own line ending in sse-starlette


def keepalive() -> ServerSentEvent:
    return ServerSentEvent(comment="keepalive", sep=SEP)


def last_event_id(request: Request) -> int:
    """The numeric `Last-Event-ID` a reconnecting client sent (0 when none)."""
    value = request.headers.get("last-event-id", "").strip()
    return int(value) if value.isdigit() else 0


def event_stream(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    return EventSourceResponse(events, sep=SEP, ping=KEEPALIVE_S, ping_message_factory=keepalive,
                               headers={"Cache-Control": "no-cache"})
