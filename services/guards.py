"""Who may do what, how often: authentication errors, the per-tenant request rate (a moving window
per tenant, counted where every API process sees it) and the per-tenant ceiling on queued and
running jobs."""

from __future__ import annotations

import logging
import math
import time
from urllib.parse import urlsplit

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from genq.services.errors import APIError
from genq.shared.db import Job, owned_by, tenant_key
from genq.shared.jobs import ACTIVE

log = logging.getLogger("genq.api")

# A full queue drains at the workers' pace, which the API cannot predict; this is a polite hint.
QUEUE_FULL_RETRY_AFTER_S = 30
RATE_WINDOW_S = 60  # GENQ_RATE_LIMIT_PER_MINUTE counts the requests of the last minute
# The rate limiter's keys in the broker's Redis database: genq-rate:rate/<tenant>/<n>/<window>/second.
RATE_KEY_PREFIX = "genq-rate"
RATE_STORAGE_TIMEOUT_S = 2.0


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class RequestRate:
    """A moving-window request rate per tenant: at most `per_minute` requests in any `window_s`
    seconds. Counted in Redis when the broker is Redis, so every API replica shares one count per
    tenant; in this process's memory otherwise (the embedded, single-machine setup)."""

    def __init__(self, storage_uri: str = "memory://", *, window_s: int = RATE_WINDOW_S,
                 **options: float | str | bool) -> None:
        self.storage: Storage = storage_from_string(storage_uri, **options)
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.window_s = window_s
        self._unavailable_logged = 0.0

    @classmethod
    def for_broker(cls, broker_url: str, *, window_s: int = RATE_WINDOW_S) -> RequestRate:
        if urlsplit(broker_url).scheme in ("redis", "rediss"):
            return cls(broker_url, window_s=window_s, key_prefix=RATE_KEY_PREFIX, wrap_exceptions=True,
                       socket_timeout=RATE_STORAGE_TIMEOUT_S, socket_connect_timeout=RATE_STORAGE_TIMEOUT_S)
        return cls(window_s=window_s)

    def _item(self, per_minute: int) -> RateLimitItem:
        return RateLimitItemPerSecond(per_minute, self.window_s, namespace="rate")

    def take(self, tenant: str, per_minute: int) -> float:
        """Count one request; returns 0 if it is within the rate, else the seconds until the
        window has room again. A storage outage lets the request through (logged at most once
        a minute): the broker is down then too, and submissions wait in the outbox."""
        if per_minute <= 0:
            return 0.0
        item = self._item(per_minute)
        try:
            if self.limiter.hit(item, tenant):
                return 0.0
            reset_at, _remaining = self.limiter.get_window_stats(item, tenant)
        except StorageError as exc:
            if time.monotonic() - self._unavailable_logged > 60:
                self._unavailable_logged = time.monotonic()
                log.warning("rate limit storage unavailable (%s); not limiting", exc.storage_error)
            return 0.0
        return max(reset_at - time.time(), 0.0)

    def clear(self, tenant: str, per_minute: int) -> None:
        self.limiter.clear(self._item(per_minute), tenant)


def check_rate(rate: RequestRate, tenant: str | None, per_minute: int) -> None:
    """Raise 429 with Retry-After when the tenant is over its request rate. Blocking (a Redis
    round trip): call it from a worker thread."""
    wait = rate.take(tenant_key(tenant), per_minute)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise APIError(
            429, f"rate limit reached: at most {per_minute} create requests per minute per tenant "
            f"(GENQ_RATE_LIMIT_PER_MINUTE); retry in {seconds}s", code="rate_limit_exceeded",
            headers={"Retry-After": str(seconds)})


def active_jobs(session: Session, tenant: str | None, *, up_to: int) -> int:
    """The tenant's queued and running jobs, counted up to `up_to` (so the count stays cheap when
    the queue is deep)."""
    rows = select(Job.id).where(Job.status.in_(ACTIVE), owned_by(Job.tenant, tenant)).limit(up_to).subquery()
    return int(session.execute(select(func.count()).select_from(rows)).scalar_one())


def check_queue_ceiling(session: Session, tenant: str | None, jobs: int, ceiling: int) -> None:
    """Raise 429 when `jobs` more would take the tenant past `ceiling` queued and running jobs.
    Two submissions at the same instant may both pass: the ceiling is a guard, not an exact count."""
    if jobs > ceiling:
        raise APIError(
            429, f"this request has {jobs} jobs, more than the limit of {ceiling} queued and running jobs "
            "per tenant (GENQ_MAX_QUEUED_JOBS); split it into smaller batches", code="queued_jobs_limit",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
    up_to = ceiling - jobs + 1
    active = active_jobs(session, tenant, up_to=up_to)
    if active + jobs > ceiling:
        count = f"at least {active}" if active == up_to else str(active)
        raise APIError(
            429, f"queued-jobs limit reached: {count} jobs queued or running, adding {jobs} would pass the limit "
            f"of {ceiling} per tenant (GENQ_MAX_QUEUED_JOBS); retry when some have finished",
            code="queued_jobs_limit", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
