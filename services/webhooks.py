"""Webhooks on the API side: checking subscriptions, the tenant's signing secret, Standard Webhooks
signatures, and the dispatcher that sends queued deliveries.

A `Dispatcher` (run by every API process) sends the due rows, records every attempt and retries
with backoff. Delivery is at least once; receivers dedupe on the `webhook-id` header, as the
Standard Webhooks spec asks.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from genq.services.egress import AddressNotAllowed, AddressPolicy, GuardedTransport
from genq.shared.db import Batch, Job, Tenant, WebhookAttempt, WebhookDelivery, session_scope, tenant_key
from genq.shared.schemas import EVENTS
from genq.shared.webhooks import PROGRESS_STATUSES, counts, enqueue_batch_event, enqueue_job_event

log = logging.getLogger("genq.webhooks")

MAX_URL = 2000


# --- subscriptions and secrets ----------------------------------------------------------------

def validate_subscription(url: str | None, events: list[str] | None, policy: AddressPolicy = AddressPolicy(),
                          ) -> tuple[str | None, list[str] | None]:
    """Check a submitted webhook_url / webhook_events pair; raises ValueError naming the problem.
    The URL's host must not be, or resolve to, an address `policy` refuses (see genq.services.egress)."""
    if url is None:
        if events is not None:
            raise ValueError("webhook_events needs a webhook_url")
        return None, None
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise ValueError(f"webhook_url must be a string of at most {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")
    _check_host(parts.hostname, policy)
    try:
        sent_to = httpx.URL(url).host  # the host the dispatcher's client will connect to
    except (httpx.InvalidURL, UnicodeError) as exc:  # UnicodeError: a host IDNA cannot encode
        raise ValueError(f"webhook_url is not a URL webhooks can be sent to ({exc})") from None
    if sent_to != parts.hostname:
        _check_host(sent_to, policy)
    if events is None:
        return url, None
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ValueError("webhook_events must be a list of strings")
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise ValueError(f"unknown webhook_events {unknown}; allowed: {list(EVENTS)}")
    return url, list(dict.fromkeys(events))


def _check_host(host: str, policy: AddressPolicy) -> None:
    try:
        policy.check_host(host)
    except UnicodeError:  # the resolver's IDNA encoding refuses it: no connection could be made
        raise ValueError(f"webhook_url host {host!r} is not a valid host name") from None
    except AddressNotAllowed:
        raise ValueError(f"webhook_url host {host!r} is not allowed: webhooks are not sent to loopback, "
                         "private, link-local, multicast, reserved or unspecified addresses") from None


def tenant_secret(session: Session, tenant: str | None) -> str:
    """The tenant's signing secret, created on first use. The caller commits."""
    tenant_id = tenant_key(tenant)
    secret = session.execute(select(Tenant.webhook_secret).where(Tenant.id == tenant_id)).scalar()
    if secret:
        return secret
    row = {"id": tenant_id, "webhook_secret": "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
           "created_at": time.time()}
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):  # a racing creator wins; we re-read its secret below
        ins = pg_insert if dialect == "postgresql" else sqlite_insert
        session.execute(ins(Tenant).values(**row).on_conflict_do_nothing(index_elements=["id"]))
    else:
        try:
            with session.begin_nested():
                session.add(Tenant(**row))
        except IntegrityError:
            pass
    return session.execute(select(Tenant.webhook_secret).where(Tenant.id == tenant_id)).scalar_one()


# --- Standard Webhooks signatures -------------------------------------------------------------
# The standardwebhooks package decodes the whsec_ secret and computes the signature. Its
# Webhook.verify is not used as is: its tolerance is a fixed 5 minutes on the wall clock (no clock
# to inject, no other tolerance), it accepts fractional timestamps, and a signature list entry
# without a comma makes it raise ValueError instead of failing the check.

def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: v1,base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
    `body` is UTF-8 (the payloads are JSON)."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    return Webhook(secret).sign(msg_id, when, body.decode("utf-8"))


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300,
           now: float | None = None) -> bool:
    """True when one of the v1 signatures matches and the timestamp is within tolerance."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, sigs = lower.get("webhook-id"), lower.get("webhook-timestamp"), lower.get("webhook-signature")
    if not (msg_id and stamp and sigs):
        return False
    try:
        ts = int(stamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    try:
        expected = sign(secret, msg_id, ts, body).encode()
    except UnicodeDecodeError:  # not JSON, so not ours
        return False
    return any(hmac.compare_digest(expected, s.encode()) for s in sigs.split() if s.startswith("v1,"))


# --- delivery ---------------------------------------------------------------------------------

class DeliveryError(StrEnum):
    """What a failed attempt tells the tenant: a category, never the socket's own words, which
    would map genq's network for whoever names the URL (those go to the log)."""

    CONNECTION_FAILED = "connection_failed"
    TIMEOUT = "timeout"
    HTTP_STATUS = "http_status"  # the receiver answered outside 2xx; the attempt has its status_code
    ADDRESS_NOT_ALLOWED = "address_not_allowed"


def public_error(stored: str | None) -> str | None:
    """A stored delivery error as the tenant sees it. Rows written before the categories hold
    raw text (`HTTP 500`, `timeout after 10s`, `ConnectError: ...`); they show as categories too."""
    if stored is None or stored in DeliveryError.__members__.values():
        return stored
    if stored.startswith("HTTP "):
        return DeliveryError.HTTP_STATUS
    return DeliveryError.TIMEOUT if stored.startswith("timeout") else DeliveryError.CONNECTION_FAILED


class Dispatcher:
    """Sends due deliveries and throttled progress events. Safe to run in several processes at once:
    rows are claimed with SKIP LOCKED plus a lease token (their next_attempt_at), so one message
    is never in flight twice."""

    def __init__(self, sessions: sessionmaker[Session], *,
                 backoff_s: Sequence[float] = (5, 30, 120, 600, 1800, 3600), timeout_s: float = 10,
                 progress_every_s: float = 5.0, batch_size: int = 50, poll_s: float = 0.5,
                 concurrency: int = 8, policy: AddressPolicy = AddressPolicy()) -> None:
        self.sessions = sessions
        self.backoff_s = tuple(backoff_s)
        self.timeout_s = timeout_s
        self.progress_every_s = progress_every_s
        self.batch_size = batch_size
        self.poll_s = poll_s
        # httpx's timeout is per phase (connect, write, read): a lease of twice it plus slack covers
        # an attempt; one that overruns it may be sent again by another dispatcher (at least once).
        self.lease_s = 2 * timeout_s + 5
        # Every connection is checked against `policy` when it is opened; redirects are not followed.
        self._client = httpx.Client(transport=GuardedTransport(policy), timeout=timeout_s, follow_redirects=False,
                                    headers={"user-agent": "genq-webhooks"})
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="genq-webhook")
        self._progress: dict[str, tuple[float, Any]] = {}
        self._secrets: dict[str | None, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # 1. claim a page of due rows: move their next_attempt_at forward, which is also their token
    def _claim(self) -> list[tuple[str, float]]:
        now = time.time()
        token = now + self.lease_s
        due = (select(WebhookDelivery.id)
               .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
               .order_by(WebhookDelivery.next_attempt_at).limit(self.batch_size)
               .with_for_update(skip_locked=True))  # Postgres: parallel dispatchers take disjoint rows
        with session_scope(self.sessions) as s:
            claimed = s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(due), WebhookDelivery.status == "pending",
                       WebhookDelivery.next_attempt_at <= now)
                .values(next_attempt_at=token).returning(WebhookDelivery.id)).scalars().all()
        return [(i, token) for i in claimed]

    def deliver_due(self) -> int:
        """Make one attempt at every due delivery (up to batch_size); returns how many were tried."""
        claimed = self._claim()
        return sum(self._pool.map(lambda c: self._attempt(*c), claimed))

    # 2. one attempt: renew the lease (skip if someone else holds it), POST, record the outcome
    def _attempt(self, delivery_id: str, token: float) -> bool:
        try:
            with session_scope(self.sessions) as s:
                lease = time.time() + self.lease_s
                res = s.execute(update(WebhookDelivery).where(
                    WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at == token).values(next_attempt_at=lease))
                if not res.rowcount:  # type: ignore[attr-defined]
                    return False
                d = s.get(WebhookDelivery, delivery_id)
                assert d is not None
                secret = self._secret(s, d.tenant)
                s.expunge(d)  # keep its loaded fields usable after the commit
            code, error, detail, duration = self._post(d, secret)
            self._record(d, lease, code, error, duration)
            if error is not None:
                log.info("webhook %s to %s: attempt %d failed: %s (%s)", d.id, d.url, d.attempts + 1, error, detail)
            return True
        except Exception:  # one bad row must not stop the others
            log.exception("webhook delivery %s failed unexpectedly", delivery_id)
            return False

    def _secret(self, session: Session, tenant: str | None) -> str:
        if tenant not in self._secrets:
            self._secrets[tenant] = tenant_secret(session, tenant)
        return self._secrets[tenant]

    def _post(self, d: WebhookDelivery, secret: str
              ) -> tuple[int | None, DeliveryError | None, str | None, float]:
        """POST one delivery: its status code, the failure's category and raw detail (for the log
        only), and how long it took."""
        body = json.dumps(d.payload, separators=(",", ":")).encode()
        ts = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": d.id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(secret, d.id, ts, body)}
        start = time.monotonic()
        try:
            # Streamed and never read: the receiver's answer body is of no use and may be large.
            with self._client.stream("POST", d.url, content=body, headers=headers) as r:
                code = r.status_code
            if 200 <= code < 300:
                return code, None, None, time.monotonic() - start
            return code, DeliveryError.HTTP_STATUS, f"HTTP {code}", time.monotonic() - start
        except AddressNotAllowed as exc:
            return None, DeliveryError.ADDRESS_NOT_ALLOWED, str(exc), time.monotonic() - start
        except httpx.TimeoutException as exc:
            return None, DeliveryError.TIMEOUT, f"{type(exc).__name__} after {self.timeout_s:g}s", \
                time.monotonic() - start
        except httpx.HTTPError as exc:
            return None, DeliveryError.CONNECTION_FAILED, f"{type(exc).__name__}: {exc}", time.monotonic() - start

    def _record(self, d: WebhookDelivery, lease: float, code: int | None, error: DeliveryError | None,
                duration: float) -> None:
        now = time.time()
        attempt = d.attempts + 1
        if error is None:
            values: dict[str, Any] = {"status": "delivered", "delivered_at": now}
        elif attempt > len(self.backoff_s):
            values = {"status": "failed"}
        else:
            values = {"next_attempt_at": now + self.backoff_s[attempt - 1] * random.uniform(1.0, 1.1)}
        if error is not None:
            values["last_error"] = str(error)
        with session_scope(self.sessions) as s:
            s.add(WebhookAttempt(delivery_id=d.id, attempt=attempt, at=now, status_code=code,
                                 error=error and str(error), duration_s=duration))
            s.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == d.id, WebhookDelivery.next_attempt_at == lease)
                .values(attempts=attempt, **values))

    # 3. progress: at most one event per object per period, and only when it moved
    def emit_progress(self) -> int:
        """Queue batch.progress (request_counts moved) and job.progress (progress moved) events."""
        now = time.time()
        sent = 0
        live: set[str] = set()
        with session_scope(self.sessions) as s:
            batches = s.execute(select(Batch).where(
                Batch.status.in_(PROGRESS_STATUSES), Batch.webhook_url.is_not(None)).limit(1000)).scalars().all()
            for b in batches:
                if "progress" in (b.webhook_events or ()):
                    live.add(b.id)
                    sent += self._throttled(s, now, b.id, "batch.progress", lambda b=b: counts(s, b),
                                            lambda counts, b=b: enqueue_batch_event(s, b, "progress", counts))
            jobs = s.execute(select(Job).where(
                Job.status == "running", Job.webhook_url.is_not(None)).limit(1000)).scalars().all()
            for j in jobs:
                if "progress" in (j.webhook_events or ()):
                    live.add(j.id)
                    sent += self._throttled(s, now, j.id, "job.progress", lambda j=j: round(j.progress or 0.0, 4),
                                            lambda _p, j=j: enqueue_job_event(s, j, "progress"))
        for gone in set(self._progress) - live:
            del self._progress[gone]
        return sent

    def _throttled(self, session: Session, now: float, object_id: str, kind: str, state: Callable[[], Any],
                   send: Callable[[Any], Any]) -> int:
        last = self._progress.get(object_id) or self._last_progress(session, object_id, kind)
        if last and now - last[0] < self.progress_every_s:
            return 0
        current = state()
        if last and last[1] == current:
            return 0
        send(current)
        self._progress[object_id] = (now, current)
        return 1

    @staticmethod
    def _last_progress(session: Session, object_id: str, kind: str) -> tuple[float, Any] | None:
        """What an earlier dispatcher (before a restart) last sent, so it is not sent again."""
        row = session.execute(select(WebhookDelivery.created_at, WebhookDelivery.payload).where(
            WebhookDelivery.object_id == object_id, WebhookDelivery.event == kind)
            .order_by(WebhookDelivery.created_at.desc()).limit(1)).first()
        if row is None:
            return None
        data = row[1]["data"]
        return row[0], data["request_counts"] if kind == "batch.progress" else data["progress"]

    # 4. the loop
    def run_once(self) -> int:
        """Queue due progress events, then make one attempt at each due delivery."""
        self.emit_progress()
        return self.deliver_due()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="genq-webhooks", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once() >= self.batch_size
            except Exception:
                log.exception("webhook dispatcher pass failed; continuing")
                busy = False
            if not busy:
                self._stop.wait(self.poll_s)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop, wait for in-flight attempts, and close the HTTP client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.lease_s)
        self._pool.shutdown(wait=True)
        self._client.close()
