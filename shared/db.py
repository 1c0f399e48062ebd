"""The results database: the source of truth for job and batch state.

Portable column types only, so SQLite (embedded) and Postgres (production) share one schema.
Times are Unix seconds as floats internally; the API shows whole seconds.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import JSON, Float, Index, Integer, String, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from genq.shared.retry import retry_while


def new_id(prefix: str) -> str:
    """Time-ordered ids: newer ids sort after older ones, which keeps cursor paging simple."""
    return f"{prefix}_{time.time_ns() // 1000:014x}{secrets.token_hex(6)}"


# Rows made while GENQ_AUTH is off belong to no tenant: NULL in tenant columns, and this name where
# a key cannot be NULL (idempotency keys, signing secrets, rate buckets). `genq keys` refuses it.
NO_TENANT = "default"


def tenant_key(tenant: str | None) -> str:
    """The tenant's name where one is needed as a key: NO_TENANT for no tenant."""
    return NO_TENANT if tenant is None else tenant


def owned_by(column: Any, tenant: str | None) -> Any:
    """A WHERE clause for rows of `tenant` (NULL for no tenant)."""
    return column.is_(None) if tenant is None else column == tenant


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16), default="24h")
    status: Mapped[str] = mapped_column(String(16), index=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int | None] = mapped_column(Integer)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    in_progress_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    finalizing_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    failed_at: Mapped[float | None] = mapped_column(Float)
    expired_at: Mapped[float | None] = mapped_column(Float)
    cancelling_at: Mapped[float | None] = mapped_column(Float)
    cancelled_at: Mapped[float | None] = mapped_column(Float)
    # While `validating`: until when the API process checking its input file holds it (renewed as
    # it goes); once this passes, another API process takes the validation over.
    validating_until: Mapped[float | None] = mapped_column(Float)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    retry_of: Mapped[str | None] = mapped_column(String(64))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_batch_seq", "batch_id", "seq"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_model_status", "model", "status"),
        Index("ix_jobs_unpublished", "published_at", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer, default=0)
    tenant: Mapped[str | None] = mapped_column(String(64))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    url: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))  # the registry model that serves it: its queue
    # The name the request used where it is not `model`: a fine-tuned model's `ft:` name (the job runs
    # on its base with its adapter). The job, its result and its stream show this name.
    requested_model: Mapped[str | None] = mapped_column(String(400))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    published_at: Mapped[float | None] = mapped_column(Float)


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), index=True, unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    webhook_secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2000))
    event: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(String(500))


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(64), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_s: Mapped[float] = mapped_column(Float)


class Adapter(Base):
    """A LoRA adapter uploaded through the API; its files live in storage under `adapters/<id>/`."""

    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_tenant_name", "tenant", "name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # the base model's kind: text or image
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{"name", "bytes", "sha256"}]
    bytes: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)  # rank, alpha, targets
    created_at: Mapped[float] = mapped_column(Float)


class WorkerState(Base):
    """What each worker process last reported: its models, cache and batching counters. The API's
    /metrics reads this table, so one scrape covers every worker."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    models: Mapped[list[str]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float, index=True)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)


class FineTuningJob(Base):
    """An OpenAI-style fine-tuning job: LoRA on a registry text model (genq.shared.fine_tuning_jobs
    has its statuses and transitions). The worker holds it through `worker` and `lease_expires_at`."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (Index("ix_fine_tuning_jobs_tenant_id", "tenant", "id"),
                      Index("ix_fine_tuning_jobs_status_lease", "status", "lease_expires_at"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))
    model: Mapped[str] = mapped_column(String(200))  # the registry's base model
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved: no "auto" left
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved: r, alpha, dropout, target_modules
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    fine_tuned_model: Mapped[str] = mapped_column(String(400))  # ft:<base>:<suffix or genq>:<id>; shown on success
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    cancel_requested_at: Mapped[float | None] = mapped_column(Float)  # a running job stops at its next step
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)  # None: the terminal ones
    published_at: Mapped[float | None] = mapped_column(Float)  # its message last reached the broker; None: not yet


class FineTuningEvent(Base):
    """A job's log line or metrics; `seq` orders them (ids made in the same microsecond do not)."""

    __tablename__ = "fine_tuning_events"
    __table_args__ = (Index("ix_fine_tuning_events_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))  # info, warn, error
    type: Mapped[str] = mapped_column(String(8))  # message, metrics
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class FineTuningCheckpoint(Base):
    """An adapter saved at a training step; its files live in storage under `key_prefix`."""

    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (Index("ix_fine_tuning_checkpoints_job_step", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    key_prefix: Mapped[str] = mapped_column(String(300))


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while workers write; busy_timeout rides out short locks.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine)
    return engine


PING_IDLE_S = 1.0  # a pooled connection unused for longer is checked before it is handed out


def _ping_when_idle(engine: Engine) -> None:
    """`pool_pre_ping`, but only for a connection idle over PING_IDLE_S: under load a connection
    goes back and forth between threads every few milliseconds, and a ping per checkout was a
    round trip per unit of work. A connection that died less than that ago fails its statement
    instead, which callers treat as the database being unavailable (and SQLAlchemy then drops
    the pool's other connections of that age)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        checked_in = record.info.get("checked_in")
        if checked_in is None or time.monotonic() - checked_in <= PING_IDLE_S:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError() from exc  # the pool connects anew and checks out again


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


T = TypeVar("T")
log = logging.getLogger("genq.db")


def is_unavailable(exc: BaseException) -> bool:
    """True for errors meaning the database cannot be reached (down, restarting, connection cut),
    as opposed to a bad statement or a constraint."""
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def retry_unavailable(fn: Callable[[], T], *, what: str, deadline_s: float = 60.0,
                      first_delay_s: float = 0.2, max_delay_s: float = 5.0) -> T:
    """Run one unit of database work, retrying with backoff while the database is unreachable,
    for up to `deadline_s` (genq.shared.retry). `fn` must be safe to run again."""
    return retry_while(is_unavailable, fn, what=what, logger=log, dependency="database",
                       deadline_s=deadline_s, first_delay_s=first_delay_s, max_delay_s=max_delay_s)
