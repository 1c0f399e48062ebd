"""A Server-Sent Events parser (the WHATWG `text/event-stream` rules) over a stream of byte chunks.

Kept rather than httpx-sse (0.4.3): its EventSource.iter_sse drops comments, so the client could
not see the server's keepalives (Client.wait_batch checks its deadline on them); and
once an id has been seen it dispatches an empty "message" event for every blank line, so each
`: keepalive` would arrive as a phantom event. It also forgets `retry:` after one event and
reports a missing id as "" rather than None."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerEvent:
    event: str  # "message" when the server names none; "" for a comment (`: ...`)
    data: str
    id: str | None = None  # the last event id in force when this event was dispatched
    retry_ms: int | None = None


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Split on CRLF, LF or CR, also when a CRLF pair straddles two chunks."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        start = 0
        while True:
            cr, lf = buf.find(b"\r", start), buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if lf != -1 and (cr == -1 or lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < len(buf):
                end, nxt = cr, cr + 2 if buf[cr + 1:cr + 2] == b"\n" else cr + 1
            else:  # a CR that ends the chunk: wait, the LF of a CRLF may be next
                break
            yield buf[start:end].decode("utf-8", errors="replace")
            start = nxt
        buf = buf[start:]
    if buf.endswith(b"\r"):
        yield buf[:-1].decode("utf-8", errors="replace")
    # Anything after the last line break is an incomplete event; the rules say drop it.


def iter_events(chunks: Iterable[bytes], *, comments: bool = False) -> Iterator[ServerEvent]:
    """Events in stream order; comments too (event "") when asked, e.g. to notice keepalives."""
    event, data = "", list[str]()
    last_id: str | None = None
    retry: int | None = None
    for line in _lines(chunks):
        if not line:
            if data:
                yield ServerEvent(event or "message", "\n".join(data), last_id, retry)
            event, data = "", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if not name:
            if comments:
                yield ServerEvent("", value, last_id, retry)
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
