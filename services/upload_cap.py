"""Upload size caps enforced while the body arrives, before any route runs.

FastAPI parses a multipart body whole (into a spooled temporary file) before the route's code
runs, so a check in the route comes after a 1 GiB upload has been received. `UploadCap` sits in
front of the app: it refuses a declared `Content-Length` over the cap before reading anything,
and counts the bytes of a chunked body as the app reads them, answering 413 (with
`Connection: close`, so the client stops sending) as soon as they pass the cap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genq.services.errors import APIError
from genq.services.state import AppState

# A multipart body holds the file plus its part headers and the other form fields; the routes
# check the file's own size exactly, this only bounds what is received for it.
MULTIPART_SLACK = 64 * 1024


@dataclass(frozen=True)
class Cap:
    """The largest file a path accepts, and the error that refuses one over it."""

    max_bytes: int
    error: APIError


CapFor = Callable[[AppState], Cap]


class _OverCap(Exception):
    """Raised into the app's body reader once the body passes the cap."""


class UploadCap:
    """ASGI middleware capping the bodies of POSTs to the paths in `caps`."""

    def __init__(self, app: ASGIApp, *, state: AppState, caps: Mapping[str, CapFor]) -> None:
        self.app, self.state, self.caps = app, state, caps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cap_for = self.caps.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if cap_for is None:
            await self.app(scope, receive, send)
            return
        cap = cap_for(self.state)
        limit = cap.max_bytes + MULTIPART_SLACK
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(cap, scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                over = True
                raise _OverCap
            return message

        async def sent(message: Message) -> None:
            nonlocal started
            if not over:  # once over, the app's answer to its failed read gives way to the 413
                started = True
                await send(message)

        try:
            await self.app(scope, counted, sent)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await _refuse(cap, scope, receive, send)


async def _refuse(cap: Cap, scope: Scope, receive: Receive, send: Send) -> None:
    response = cap.error.response()
    response.headers["connection"] = "close"  # the rest of the body is not wanted
    await response(scope, receive, send)
