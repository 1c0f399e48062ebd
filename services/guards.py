"""Who may do what, how often: authentication errors, the per-tenant request rate (a token bucket
per tenant in each API process) and the per-tenant ceiling on queued and running jobs."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from genq.services.errors import APIError
from genq.shared.db import Job, owned_by, tenant_key
from genq.shared.jobs import ACTIVE

# A full queue drains at the workers' pace, which the API cannot predict; this is a polite hint.
QUEUE_FULL_RETRY_AFTER_S = 30


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class TokenBuckets:
    """One token bucket per tenant: it holds up to `per_minute` requests and refills at
    `per_minute / 60` a second, so a tenant may burst a minute's worth, then keeps that pace."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, updated at)
        self._lock = threading.Lock()

    def take(self, tenant: str, per_minute: int) -> float:
        """Take a token; returns 0 if granted, else the seconds until one is available."""
        if per_minute <= 0:
            return 0.0
        rate = per_minute / 60.0
        with self._lock:
            now = self.clock()
            tokens, updated = self._buckets.get(tenant, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - updated) * rate)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1.0 - tokens) / rate


def check_rate(buckets: TokenBuckets, tenant: str | None, per_minute: int) -> None:
    """Raise 429 with Retry-After when the tenant is over its request rate."""
    wait = buckets.take(tenant_key(tenant), per_minute)
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
