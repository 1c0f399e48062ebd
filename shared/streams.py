"""Token streams: how text a worker generates for a `stream: true` job reaches the API as it is made.

On a Redis broker each streaming job has a Redis stream, `genq:stream:<job id>`: the worker
appends the text of each step (`append`), the API reads from where it left off (`read`), and the
key expires an hour after its last write. Entries carry the job's attempt, so text from an attempt
that was lost (its worker died) can be told apart. Other brokers have no token streams: a
streaming request there is answered when the job ends, in one chunk per choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

STREAM_TTL_S = 3600
MAX_ENTRIES = 100_000  # per job; far beyond any single generation's steps


def stream_key(job_id: str) -> str:
    return f"genq:stream:{job_id}"


@dataclass(frozen=True)
class Delta:
    """New text of one choice, from one attempt of the job."""

    attempt: int
    choice: int
    text: str


class TokenSink(Protocol):
    """What a worker writes a streaming job's text to."""

    def append(self, job_id: str, attempt: int, deltas: list[tuple[int, str]]) -> None: ...


def _decode(fields: dict[bytes, bytes]) -> list[Delta]:
    attempt = int(fields[b"a"])
    return [Delta(attempt, choice, text) for choice, text in json.loads(fields[b"d"])]


class RedisTokenSink:
    """The worker's side: one XADD (and expiry refresh) per step of a streaming job."""

    def __init__(self, url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_connect_timeout=3)

    def append(self, job_id: str, attempt: int, deltas: list[tuple[int, str]]) -> None:
        key = stream_key(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(key, {"a": attempt, "d": json.dumps(deltas)}, maxlen=MAX_ENTRIES, approximate=True)
        pipe.expire(key, STREAM_TTL_S)
        pipe.execute()


class RedisTokenSource:
    """The API's side, on asyncio: entries after the last one read, waiting up to `block_ms`."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self.redis: Any = redis.asyncio.Redis.from_url(url, socket_connect_timeout=3)

    async def read(self, job_id: str, after: str, block_ms: int) -> tuple[str, list[Delta]]:
        """(id of the last entry read, its deltas); `after` "0" reads from the start. `block_ms` 0
        does not wait (Redis's own BLOCK 0 would wait forever)."""
        found = await self.redis.xread({stream_key(job_id): after}, block=block_ms or None, count=1000)
        deltas: list[Delta] = []
        for _, entries in found or []:
            for entry_id, fields in entries:
                after = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                deltas += _decode(fields)
        return after, deltas

    async def started(self, job_id: str, block_ms: int) -> bool:
        """Whether the job has streamed anything yet, waiting up to `block_ms` for it."""
        return bool(await self.redis.xread({stream_key(job_id): "0"}, block=block_ms or None, count=1))

    async def close(self) -> None:
        await self.redis.aclose()


def streams_on(broker_url: str) -> bool:
    """Whether this broker carries token streams (Redis does)."""
    return urlsplit(broker_url).scheme in ("redis", "rediss")


def token_sink(broker_url: str) -> TokenSink | None:
    return RedisTokenSink(broker_url) if streams_on(broker_url) else None
