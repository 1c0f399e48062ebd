"""The Celery side of a worker: a thin task that hands the job id to the runtime."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

from celery import Celery, signals
from sqlalchemy.exc import OperationalError

from genq.shared.broker import FINE_TUNE_TASK, RUN_JOB_TASK, CeleryPublisher, make_celery, queue_name, train_queue_name
from genq.shared.config import Settings
from genq.shared.fine_tuning_jobs import TRAINABLE_KINDS
from genq.shared.registry import Registry, load_registry
from genq.shared.storage import storage_from_settings
from genq.workers.cache import device_budget
from genq.workers.runners.device import resolve_device
from genq.workers.runtime import WorkerRuntime
from genq.workers.settings import WorkerSettings

log = logging.getLogger("genq.worker")
PIPELINE_JOBS = 16  # jobs held at once by a worker whose models run one job at a time


def build_worker(settings: Settings, models: list[str], worker: WorkerSettings | None = None, *,
                 device: str | None = None) -> tuple[Celery, WorkerRuntime]:
    """The Celery app and runtime of a worker serving `models` (see WorkerSettings for the rest)."""
    worker = worker or WorkerSettings()
    app = make_celery(settings)
    budget = worker.budget_bytes()
    if budget is None:
        budget = device_budget(resolve_device(device or "auto"))
    runtime = WorkerRuntime(settings, load_registry(settings.models_file), storage_from_settings(settings),
                            CeleryPublisher(app), models=models, lease_s=worker.lease_s,
                            max_attempts=worker.max_attempts, device=device, memory_budget=budget)

    # If the database is briefly unreachable the message goes back with a growing delay instead of
    # being acknowledged as done; the guarded state changes make the second delivery harmless.
    @app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=(OperationalError,), retry_backoff=True, retry_backoff_max=30, max_retries=None)
    def run_job(job_id: str) -> str:
        return runtime.execute(job_id)

    if worker.work != "inference" and (trainable := training_models(runtime.registry, models)):
        from genq.workers.fine_tune import FineTuner, TrainingLimits

        tuner = FineTuner(runtime.sessions, runtime.storage, runtime.registry, runtime.publisher,
                          worker_id=runtime.worker_id, device=runtime.device, stopping=runtime.stopping,
                          limits=TrainingLimits(worker.lease_s, worker.max_attempts, worker.checkpoint_every))
        runtime.fine_tuner, runtime.training_models = tuner, trainable

        # A training run holds its message until it ends; the job's own lease recovers a dead worker's.
        @app.task(name=FINE_TUNE_TASK, acks_late=True, reject_on_worker_lost=True,
                  autoretry_for=(OperationalError,), retry_backoff=True, retry_backoff_max=30, max_retries=None)
        def fine_tune(job_id: str) -> str:
            return tuner.execute(job_id)

        # A warm shutdown waits for running tasks: a training run stops at its next step instead
        # (with a checkpoint) and goes back to the queue for another worker to resume.
        signals.worker_shutting_down.connect(lambda **_: tuner.halt.set(), weak=False)

    return app, runtime


def training_models(registry: Registry, models: list[str]) -> list[str]:
    """The models whose fine-tuning jobs a worker serving `models` takes (text models)."""
    return [m for m in models if (spec := registry.get(m)) is not None and spec.kind in TRAINABLE_KINDS]


def worker_queues(registry: Registry, models: list[str], worker: WorkerSettings) -> list[str]:
    """The queues a worker consumes: its models' (unless it only trains) and their training queues
    (unless it only serves)."""
    queues = [] if worker.work == "training" else [queue_name(m) for m in models]
    if worker.work != "inference":
        queues += [train_queue_name(m) for m in training_models(registry, models)]
    return queues


def _hand_back_on_cold_shutdown(runtime: WorkerRuntime) -> None:
    """Celery's cold shutdown (SIGQUIT) cancels running tasks through the pool, which the solo and
    threads pools cannot do: the NotImplementedError it raises would surface inside the job and
    fail it. Instead mark the runtime stopping: a running job stops at its next cancel check and
    goes back to the queue, and Celery then exits as a cold shutdown does."""
    installed = [False]

    @signals.worker_ready.connect(weak=False)
    def _install(**_: Any) -> None:  # after Celery installed its own handlers
        if installed[0]:
            return
        installed[0] = True
        previous = signal.getsignal(signal.SIGQUIT)

        def on_sigquit(signum: int, frame: FrameType | None) -> None:
            runtime.stopping.set()
            if callable(previous):
                try:
                    previous(signum, frame)  # stops consuming; exits once the running task returns
                except NotImplementedError:
                    pass

        signal.signal(signal.SIGQUIT, on_sigquit)


def default_concurrency(registry: Registry, models: list[str]) -> int:
    """The most jobs any model that batches wants held: `held_batches` batches of `max_batch_size`
    (one batch runs while the next is claimed and prepared; images hold more, see ImageOptions).
    PIPELINE_JOBS when none batches: one job runs while the others' claims and outcomes are
    recorded together (workers/coalesce.py), instead of each waiting its turn."""
    sizes = [spec.options.held_batches * spec.options.max_batch_size for m in models
             if (spec := registry.get(m)) is not None and spec.options.batches()]
    return max(sizes, default=PIPELINE_JOBS)


def run_worker(settings: Settings, models: list[str], worker: WorkerSettings | None = None, *,
               preload: bool = True, loglevel: str = "INFO") -> None:
    """Start consuming the models' queues in this process (pool solo, or threads for concurrency > 1:
    never prefork, so CUDA is never initialised in a process that forks)."""
    worker = worker or WorkerSettings()
    app, runtime = build_worker(settings, models, worker)
    concurrency = worker.concurrency
    if concurrency is None:
        concurrency = default_concurrency(runtime.registry, models)
    log.info("worker %s: concurrency %d, model memory budget %s", runtime.worker_id, concurrency,
             f"{runtime.memory_budget >> 20} MiB" if runtime.memory_budget else "unlimited")
    if preload and worker.work != "training":
        runtime.preload()
    runtime.start_maintenance()
    _hand_back_on_cold_shutdown(runtime)
    pool = "solo" if concurrency <= 1 else "threads"
    queues = worker_queues(runtime.registry, models, worker)
    if not queues:
        raise ValueError(f"nothing to do: --work training, but none of {', '.join(models)} can be fine-tuned")
    argv = ["worker", "-Q", ",".join(queues), "--pool", pool,
            "--concurrency", str(max(1, concurrency)), "--loglevel", loglevel,
            "--hostname", f"genq-{'+'.join(models)}-{runtime.worker_id.split(':')[1]}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    try:
        app.worker_main(argv)
    finally:
        # A warm shutdown (SIGTERM) lets the running job finish; whatever is still held now (a
        # cold shutdown's threads) goes back to the queue instead of waiting for its lease.
        runtime.hand_back_all()
        runtime.stop()
