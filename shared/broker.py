"""Celery wiring shared by the API (which publishes) and the workers (which consume).

Messages carry only a job id; the body lives in the results database. One queue per model.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from celery import Celery
from kombu.exceptions import ChannelError

from genq.shared.config import Settings
from genq.shared.redis_transport import FRONT_HEADER, TRANSPORT, read_epoch
from genq.shared.requests import effective_priority

RUN_JOB_TASK = "genq.run_job"
FINE_TUNE_TASK = "genq.fine_tune"  # args: [fine-tuning job id]
# Above the longest job we expect to run; genq's own job leases recover crashed work much sooner.
VISIBILITY_TIMEOUT_S = 6 * 3600


def queue_name(model: str) -> str:
    return f"genq.{model}"


def train_queue_name(model: str) -> str:
    """The queue of fine-tuning jobs on a base model, apart from its serving queue: a training run
    holds a GPU for a long time, and the workers that take it are chosen by this name."""
    return f"genq.train.{model}"


@dataclass(frozen=True)
class Publish:
    job_id: str
    model: str
    priority: int | None = None
    # Ahead of queued work of the same priority: a job that already waited (recovered from a dead
    # worker, or re-published after the broker lost it). Redis only; other brokers queue it last.
    front: bool = False


class Publisher(Protocol):
    """What the API needs from the broker."""

    def publish(self, items: Iterable[Publish]) -> int: ...
    def publish_fine_tune(self, job_id: str, model: str) -> None: ...
    def ping(self) -> None: ...
    def pending(self, model: str) -> int | None: ...
    def epoch(self) -> float | None: ...


def is_redis(broker_url: str) -> bool:
    return urlsplit(broker_url).scheme in ("redis", "rediss")


def make_celery(settings: Settings) -> Celery:
    broker = settings.broker_url
    if broker.startswith("sqla+sqlite:///"):
        path = broker.removeprefix("sqla+sqlite:///")
        if path and not path.startswith(":"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    app = Celery("genq", broker=broker, set_as_current=False)
    transport_options: dict[str, object] = {}
    transport: str | None = None
    if is_redis(broker):
        transport = TRANSPORT  # kombu's, plus front-of-queue messages and the epoch (redis_transport.py)
        # Redis emulates priorities with one list per step; prefetch 1 makes them mean something.
        transport_options.update(visibility_timeout=VISIBILITY_TIMEOUT_S, queue_order_strategy="priority",
                                 priority_steps=list(range(10)), sep=":",
                                 # An unreachable host must not hold a submission for minutes.
                                 socket_connect_timeout=3)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport=transport,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # A publish retries once, then fails fast: the job is already recorded, and the outbox
        # sweeper (shared/outbox.py) publishes it when the broker is back.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.2},
        task_default_queue="genq.default",
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def _batched(producer: Any) -> AbstractContextManager[Any]:
    """kombu 5.7+ pipelines a run of publishes on Redis (one round trip per 1,000 messages)."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=1000) if batch is not None else nullcontext()


class CeleryPublisher:
    """Publishes job ids to per-model queues over one pooled broker connection."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.redis = is_redis(str(app.conf.broker_url))

    def publish(self, items: Iterable[Publish]) -> int:
        items = list(items)
        # Each front message goes ahead of the ones before it: send those in reverse to keep their order.
        ordered = [i for i in items if not i.front] + [i for i in reversed(items) if i.front]
        count = 0
        with self.app.producer_or_acquire() as producer, _batched(producer):
            for item in ordered:
                # kombu's Redis transport serves its priority lists from 0 up (0 = most urgent), so
                # genq's 9 (most urgent) maps to 0 and a job stored without one (before genq stored
                # the effective priority) to genq's default.
                priority = 9 - effective_priority(item.priority)
                self.app.send_task(RUN_JOB_TASK, args=[item.job_id], queue=queue_name(item.model),
                                   priority=priority, producer=producer,
                                   headers={FRONT_HEADER: True} if item.front else None)
                count += 1
        return count

    def publish_fine_tune(self, job_id: str, model: str) -> None:
        """Send a fine-tuning job's id to its base model's training queue."""
        self.app.send_task(FINE_TUNE_TASK, args=[job_id], queue=train_queue_name(model))

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def pending(self, model: str) -> int | None:
        """Messages waiting in a model's queue (not those a worker holds); 0 if the queue is gone."""
        with self.app.pool.acquire(block=True, timeout=5) as conn:
            try:
                return int(conn.default_channel.queue_declare(queue_name(model), passive=True).message_count)
            except ChannelError:  # no such queue: a restarted broker, or nothing was ever sent
                return 0

    def epoch(self) -> float | None:
        """When the broker's present data began (redis_transport.EPOCH_KEY): jobs published before
        it lost their messages. None on brokers other than Redis, which cannot tell."""
        if not self.redis:
            return None
        with self.app.pool.acquire(block=True, timeout=5) as conn:
            return read_epoch(conn.default_channel.client)
