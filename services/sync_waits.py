"""The per-tenant cap on synchronous requests waiting at once (GENQ_MAX_SYNC_WAITS_PER_TENANT).

A waiting request costs no thread and no database connection, but it holds a client connection
and polls the job; the cap keeps one tenant from piling up an unbounded number of them. With a
Redis broker the count is shared by every API process: each wait is a member of the tenant's sorted
set in Redis, scored by when its lease ends; the holder renews the lease while it waits, so the
places of a process that died free themselves within LEASE_S. Other brokers count in this process.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from genq.services.errors import APIError
from genq.shared.errors import ErrorCode

log = logging.getLogger("genq.api")

KEY_PREFIX = "genq-sync-waits:"  # + tenant: a sorted set of wait ids scored by lease end (Redis time)
LEASE_S = 30.0
RENEW_S = LEASE_S / 3
RETRY_AFTER_S = 5  # a wait ends when its job does, which the API cannot predict: a polite hint
STORAGE_TIMEOUT_S = 2.0
UNAVAILABLE = (RedisError, OSError)

# Drop expired leases, then take a place if there is room (atomic: one script). Redis's own clock,
# so API machines whose clocks differ agree. KEYS[1] the tenant's set; ARGV cap, member, lease.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""
_RENEW = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])))
return 1
"""


def over_cap(cap: int) -> APIError:
    return APIError(429, f"too many synchronous requests waiting: at most {cap} per tenant at once "
                    "(GENQ_MAX_SYNC_WAITS_PER_TENANT); retry when one has been answered, or submit with "
                    "POST /v1/jobs and read the job", code=ErrorCode.SYNC_WAITS_LIMIT,
                    headers={"Retry-After": str(RETRY_AFTER_S)})


class SyncWaits:
    """Places for waiting synchronous requests, per tenant: in Redis (shared) or in memory."""

    def __init__(self, redis_url: str | None = None) -> None:
        self.counts: dict[str, int] = {}  # in memory: the tenant's waits in this process
        self.redis: Any = None
        if redis_url is not None:
            import redis.asyncio

            self.redis = redis.asyncio.Redis.from_url(redis_url, socket_timeout=STORAGE_TIMEOUT_S,
                                                      socket_connect_timeout=STORAGE_TIMEOUT_S)
            self._take, self._renew = self.redis.register_script(_TAKE), self.redis.register_script(_RENEW)
        self._unavailable_logged = 0.0

    @classmethod
    def for_broker(cls, broker_url: str) -> SyncWaits:
        return cls(broker_url if urlsplit(broker_url).scheme in ("redis", "rediss") else None)

    @asynccontextmanager
    async def hold(self, tenant: str, cap: int) -> AsyncIterator[None]:
        """One place for `tenant` while the block runs, or 429 when its `cap` places are taken
        (cap 0: no cap)."""
        if cap <= 0:
            yield
        elif self.redis is None:
            if self.counts.get(tenant, 0) >= cap:
                raise over_cap(cap)
            self.counts[tenant] = self.counts.get(tenant, 0) + 1
            try:
                yield
            finally:
                self.counts[tenant] -= 1
        else:
            async with self._shared(tenant, cap):
                yield

    @asynccontextmanager
    async def _shared(self, tenant: str, cap: int) -> AsyncIterator[None]:
        key, member = KEY_PREFIX + tenant, uuid.uuid4().hex
        try:
            taken = bool(await self._take(keys=[key], args=[cap, member, LEASE_S]))
        except UNAVAILABLE as exc:  # Redis down: the broker is too; submissions wait in the outbox
            self._unavailable(exc)
            taken = None
        if taken is None:
            yield
            return
        if not taken:
            raise over_cap(cap)
        renewer = asyncio.create_task(self._keep(key, member))
        try:
            yield
        finally:
            renewer.cancel()
            try:
                await self.redis.zrem(key, member)
            except UNAVAILABLE as exc:  # the lease runs out by itself
                self._unavailable(exc)

    async def _keep(self, key: str, member: str) -> None:
        """Renew the lease of a place while its request waits."""
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                await self._renew(keys=[key], args=[member, LEASE_S])
            except UNAVAILABLE as exc:  # try again at the next renewal
                self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> None:
        if time.monotonic() - self._unavailable_logged > 60:
            self._unavailable_logged = time.monotonic()
            log.warning("sync wait counts unavailable in Redis (%s: %s); not limiting", type(exc).__name__, exc)
