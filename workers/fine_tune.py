"""Fine-tuning jobs on a worker: the body of the `genq.fine_tune` task.

A job is claimed with a guarded `queued -> running` update and held by a lease that training renews
as it goes. Its data comes from object storage (the files the API checked), training runs in
genq.workers.training, and everything training reports lands here:

- progress: `metrics` events on the job (at most one every EVENT_EVERY_S, plus each validation pass
  and the last step), which the fine-tuning events list serves;
- checkpoints: the adapter and the trainer state under `fine_tuning/<job>/step-<n>/` in storage and
  a checkpoint row; a job taken over after its worker died resumes from the newest one, so no step
  before it is run again;
- cancellation: the API sets `cancel_requested_at`; training checks it between steps (read from the
  database at most every CHECK_EVERY_S), saves a checkpoint and stops; a worker shutting down stops
  the same way but hands the job back to the queue, where another worker resumes it.

A succeeded job's adapter becomes one of the tenant's adapters, named after the job's
`fine_tuned_model` (`ft:<base>:<suffix>:<job id>`), which requests then name as their model.
One worker trains one job at a time (`FineTuner._one`); training shares the worker's device with
its inference jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from genq.shared import fine_tuning_jobs as ft_state
from genq.shared import webhooks
from genq.shared.adapters import storage_key as adapter_storage_key
from genq.shared.broker import Publisher
from genq.shared.db import Adapter, File, FineTuningCheckpoint, FineTuningJob, new_id, session_scope
from genq.shared.errors import ErrorCode
from genq.shared.fine_tuning import ChatExample, Example, PromptExample, parse_training_file
from genq.shared.fine_tuning_jobs import add_event, checkpoint_model_name, new_ft_id
from genq.shared.registry import Registry
from genq.shared.storage import Storage
from genq.workers.training import Checkpoint, TrainingConfig, TrainingHooks, TrainingResult, train

log = logging.getLogger("genq.worker.fine_tune")
CHECK_EVERY_S = 1.0  # cancel checks and lease renewals while training
EVENT_EVERY_S = 1.0  # metrics events at most this often
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE, POSITION_FILE = "trainer_state.pt", "checkpoint.json"
DEFAULT_CHECKPOINT_EVERY = 50  # steps; WorkerSettings.checkpoint_every overrides it


class LeaseLost(Exception):
    """Another worker holds the job now (this worker's lease ran out): stop without a trace."""


@dataclass(frozen=True)
class TrainingLimits:
    lease_s: float
    max_attempts: int
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"fine_tuning/{job_id}/step-{step:08d}/"


def as_dict(example: Example) -> dict[str, Any]:
    """An example as genq.workers.training takes it."""
    if isinstance(example, PromptExample):
        return {"prompt": example.prompt, "completion": example.completion}
    assert isinstance(example, ChatExample)
    return {"messages": [{"role": m.role, "content": m.content, "weight": m.weight} for m in example.messages]}


# --- the job's rows -------------------------------------------------------------------------------

def claim(session: Session, job_id: str, *, worker: str, lease_s: float) -> FineTuningJob | None:
    """queued -> running for this worker, unless it was cancelled meanwhile."""
    now = time.time()
    res = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.status == "queued",
               FineTuningJob.cancel_requested_at.is_(None))
        .values(status="running", worker=worker, attempts=FineTuningJob.attempts + 1, lease_expires_at=now + lease_s,
                started_at=now)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        return None
    return session.get(FineTuningJob, job_id)


def _held(job_id: str, worker: str) -> tuple[Any, ...]:
    return (FineTuningJob.id == job_id, FineTuningJob.status == "running", FineTuningJob.worker == worker)


def requeue_expired_training(session: Session, *, models: list[str], max_attempts: int) -> tuple[list[tuple[str, str]],
                                                                                                   list[str]]:
    """Running fine-tuning jobs whose worker stopped renewing the lease: back to queued (to be
    published again, and resumed from their newest checkpoint), or failed after max_attempts starts.
    Returns ([(job id, model)] to publish, failed ids)."""
    now = time.time()
    rows = session.execute(select(FineTuningJob.id, FineTuningJob.model, FineTuningJob.attempts).where(
        FineTuningJob.status == "running", FineTuningJob.lease_expires_at < now,
        FineTuningJob.model.in_(models)).limit(100)).all()
    publish, failed = [], []
    for job_id, model, attempts in rows:
        guard = (FineTuningJob.id == job_id, FineTuningJob.status == "running", FineTuningJob.lease_expires_at < now)
        if attempts >= max_attempts:
            values: dict[str, Any] = {"status": "failed", "finished_at": now, "lease_expires_at": None,
                                      "error": {"code": ErrorCode.WORKER_LOST.value, "param": None,
                                                "message": f"the worker training this job stopped {attempts} times"}}
        else:
            values = {"status": "queued", "worker": None, "lease_expires_at": None, "published_at": None}
        if session.execute(update(FineTuningJob).where(*guard).values(**values)).rowcount:  # type: ignore[attr-defined]
            if attempts >= max_attempts:
                add_event(session, job_id, f"The job failed: its worker stopped {attempts} times", level="error")
                webhooks.notify_fine_tuning(session, job_id, "failed")
                failed.append(job_id)
            else:
                add_event(session, job_id, "The worker training this job stopped; the job is queued again and "
                          "resumes from its last checkpoint", level="warn")
                publish.append((job_id, model))
    return publish, failed


def latest_checkpoint(session: Session, storage: Storage, job_id: str) -> Checkpoint | None:
    """The job's newest checkpoint, read back from storage."""
    row = session.execute(select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
                          .order_by(FineTuningCheckpoint.step.desc()).limit(1)).scalar_one_or_none()
    if row is None:
        return None
    position = json.loads(storage.get(row.key_prefix + POSITION_FILE))
    return Checkpoint(step=position["step"], epoch=position["epoch"], position=position["position"],
                      adapter_files={name: storage.get(row.key_prefix + name) for name in CHECKPOINT_FILES},
                      trainer_state=storage.get(row.key_prefix + STATE_FILE))


# --- one job ----------------------------------------------------------------------------------------

class _Window:
    """The steps since the last metrics event written: their tokens, seconds and summed loss."""

    def __init__(self) -> None:
        self.at: int | None = None  # trained_tokens at the last step seen
        self.tokens, self.seconds, self.loss = 0, 0.0, 0.0

    def add(self, event: dict[str, Any]) -> None:
        # One progress event covers the steps since the one before: its trained tokens are the growth
        # of trained_tokens (the first after a start or resume: taken as one step's worth, by its rate).
        rate, loss = float(event.get("tokens_per_s") or 0.0), float(event.get("train_loss") or 0.0)
        tokens = event["trained_tokens"] - self.at if self.at is not None else None
        self.at = event["trained_tokens"]
        if tokens is None:
            self.tokens, self.seconds, self.loss = 0, 0.0, 0.0
            tokens = 1  # weights the first window's rate and loss alone
        self.tokens += tokens
        self.seconds += tokens / rate if rate > 0 else 0.0
        self.loss += loss * tokens

    def take(self) -> dict[str, float]:
        out = {"train_loss": self.loss / self.tokens if self.tokens else 0.0,
               "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0}
        self.tokens, self.seconds, self.loss = 0, 0.0, 0.0
        return out


class _Run:
    """One attempt at one job: the hooks training calls, and what they write."""

    def __init__(self, tuner: FineTuner, job: FineTuningJob) -> None:
        self.tuner, self.job = tuner, job
        self.job_id, self.worker = job.id, tuner.worker_id
        self._checked = self._evented = 0.0
        self._window = _Window()
        self._cancel = False
        self.stopping = False  # the worker is shutting down: hand the job back
        self.last_metrics: dict[str, Any] = {}

    def _session(self) -> Any:
        return session_scope(self.tuner.sessions)

    def progress(self, event: dict[str, Any]) -> None:
        """Write a metrics event at most every EVENT_EVERY_S (and at validation passes and the end);
        its train_loss and tokens_per_s cover every step since the last one written."""
        self.last_metrics = {**self.last_metrics, **event}
        self._window.add(event)
        now = time.monotonic()
        final = event.get("step") == event.get("total_steps")
        if not (final or "valid_loss" in event or now - self._evented >= EVENT_EVERY_S):
            return
        self._evented = now
        data = {k: event[k] for k in ("step", "total_steps", "valid_loss", "trained_tokens", "epoch")
                if event.get(k) is not None}
        data.update(self._window.take())
        text = f"Step {event['step']}/{event['total_steps']}: training loss={data['train_loss']:.4f}"
        if "valid_loss" in event:
            text += f", validation loss={event['valid_loss']:.4f}"
        with self._session() as s:
            add_event(s, self.job_id, text, kind="metrics", data=data)

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        prefix = checkpoint_prefix(self.job_id, ckpt.step)
        storage = self.tuner.storage
        for name in CHECKPOINT_FILES:
            storage.put(prefix + name, ckpt.adapter_files[name])
        storage.put(prefix + STATE_FILE, ckpt.trainer_state)
        storage.put(prefix + POSITION_FILE, json.dumps({"step": ckpt.step, "epoch": ckpt.epoch,
                                                        "position": ckpt.position}).encode(), "application/json")
        metrics = {"step": float(ckpt.step)}
        for key in ("train_loss", "valid_loss"):
            if self.last_metrics.get(key) is not None:
                metrics[key] = float(self.last_metrics[key])
        with self._session() as s:
            if not self._renew(s):
                raise LeaseLost(self.job_id)
            s.add(FineTuningCheckpoint(id=new_ft_id("ftckpt"), job_id=self.job_id, created_at=time.time(),
                                       step=ckpt.step, metrics=metrics, key_prefix=prefix))
            name = checkpoint_model_name(self.job.fine_tuned_model, ckpt.step)
            add_event(s, self.job_id, f"Checkpoint created at step {ckpt.step}",
                      data={"step": ckpt.step, "checkpoint": name})
            webhooks.notify_fine_tuning(s, self.job_id, "progress", metrics={
                **{k: v for k, v in self.last_metrics.items() if v is not None}, "step": ckpt.step})

    def cancelled(self) -> bool:
        """Whether training should stop now: a cancel, this worker stopping, or the lease lost."""
        if self.tuner.stopping.is_set() or self.tuner.halt.is_set():
            self.stopping = True
            return True
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return self._cancel
        self._checked = now
        with self._session() as s:
            if not self._renew(s):
                raise LeaseLost(self.job_id)
            requested = s.execute(select(FineTuningJob.cancel_requested_at)
                                  .where(FineTuningJob.id == self.job_id)).scalar_one_or_none()
        self._cancel = requested is not None
        return self._cancel

    def _renew(self, s: Session) -> bool:
        res = s.execute(update(FineTuningJob).where(*_held(self.job_id, self.worker))
                        .values(lease_expires_at=time.time() + self.tuner.limits.lease_s))
        return bool(res.rowcount)  # type: ignore[attr-defined]

    def hooks(self) -> TrainingHooks:
        return TrainingHooks(progress=self.progress, save_checkpoint=self.save_checkpoint, cancelled=self.cancelled)


class FineTuner:
    """Runs the fine-tuning jobs a worker takes, one at a time."""

    def __init__(self, sessions: sessionmaker[Session], storage: Storage, registry: Registry, publisher: Publisher, *,
                 worker_id: str, limits: TrainingLimits, device: str | None, stopping: threading.Event,
                 trainer: Callable[..., TrainingResult] = train) -> None:
        self.sessions, self.storage, self.registry, self.publisher = sessions, storage, registry, publisher
        self.worker_id, self.limits, self.device, self.stopping = worker_id, limits, device, stopping
        self.trainer = trainer
        self._one = threading.Lock()
        self.halt = threading.Event()  # set when the worker shuts down: stop training, hand the job back
        self.running: str | None = None  # the job being trained, for the lease loop and metrics

    def execute(self, job_id: str) -> str:
        """Train job `job_id` if it is still queued; returns what became of it."""
        with self._one:
            with session_scope(self.sessions) as s:
                job = claim(s, job_id, worker=self.worker_id, lease_s=self.limits.lease_s)
                if job is None:
                    return "skipped"  # cancelled, finished, or another worker's
                s.expunge(job)
            self.running = job_id
            try:
                return self._run(job)
            finally:
                self.running = None

    def _run(self, job: FineTuningJob) -> str:
        run = _Run(self, job)
        try:
            train_examples, valid_examples = self._data(job)
            with session_scope(self.sessions) as s:
                resume = latest_checkpoint(s, self.storage, job.id)
                text = f"Fine-tuning job started on {self.worker_id}"
                if resume is not None:
                    text = f"Fine-tuning job resumed from step {resume.step} on {self.worker_id}"
                add_event(s, job.id, text)
            result = self.trainer(self._model_source(job), train_examples, config=self._config(job),
                                  valid_examples=valid_examples, hooks=run.hooks(), resume=resume,
                                  device=self._device(job))
        except LeaseLost:
            log.warning("fine-tuning job %s: another worker holds it now; stopping", job.id)
            return "lost"
        except Exception as exc:
            log.exception("fine-tuning job %s failed", job.id)
            self._fail(job, exc)
            return "failed"
        if run.stopping:
            self._hand_back(job)
            return "handed back"
        if result.cancelled:
            return self._finish(job, "cancelled", result, "Fine-tuning job cancelled")
        return self._succeed(job, result)

    # --- inputs ---

    def _model_source(self, job: FineTuningJob) -> str:
        spec = self.registry.get(job.model)
        if spec is None:
            raise ValueError(f"model {job.model!r} is no longer in the registry")
        return str(spec.source)

    def _device(self, job: FineTuningJob) -> str:
        """Where the model's inference runs on this worker (as the text runner decides it): the
        worker's device, else the registry entry's (`auto`: the first visible GPU, else the CPU)."""
        from genq.workers.runners.device import resolve_device

        spec = self.registry.get(job.model)
        return resolve_device(self.device or (spec.device if spec else "auto"))

    def _config(self, job: FineTuningJob) -> TrainingConfig:
        hp, lora = job.hyperparameters, job.lora
        return TrainingConfig(n_epochs=int(hp["n_epochs"]), batch_size=int(hp["batch_size"]),
                              learning_rate_multiplier=float(hp["learning_rate_multiplier"]),
                              lora_r=int(lora["r"]), lora_alpha=float(lora["alpha"]),
                              lora_dropout=float(lora["dropout"]), target_modules=lora.get("target_modules"),
                              seed=int(job.seed), checkpoint_every=self.limits.checkpoint_every,
                              eval_every=self.limits.checkpoint_every)

    def _data(self, job: FineTuningJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        def read(file_id: str) -> list[dict[str, Any]]:
            with session_scope(self.sessions) as s:
                row = s.get(File, file_id)
                if row is None:
                    raise ValueError(f"file {file_id} was deleted before training started")
                key = row.key
            examples, errors = parse_training_file(self.storage.get(key))
            if errors:
                raise ValueError(f"file {file_id}: {errors[0].as_dict()['message']}")
            return [as_dict(e) for e in examples]

        return read(job.training_file), read(job.validation_file) if job.validation_file else None

    # --- outcomes ---

    def _succeed(self, job: FineTuningJob, result: TrainingResult) -> str:
        adapter_id = new_id("adapter")
        for name, data in result.adapter_files.items():
            self.storage.put(adapter_storage_key(adapter_id, name), data)
        config = json.loads(result.adapter_files["adapter_config.json"])
        files = [{"name": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                 for n, d in result.adapter_files.items()]
        with session_scope(self.sessions) as s:
            done = s.execute(update(FineTuningJob).where(*_held(job.id, self.worker_id)).values(
                status="succeeded", finished_at=time.time(), lease_expires_at=None,
                trained_tokens=result.trained_tokens))
            if not done.rowcount:  # type: ignore[attr-defined]
                s.rollback()
                self.storage.delete_prefix(f"adapters/{adapter_id}/")
                return "lost"
            s.add(Adapter(id=adapter_id, tenant=job.tenant, name=job.fine_tuned_model, base_model=job.model,
                          kind="text", files=files, bytes=sum(f["bytes"] for f in files), created_at=time.time(),
                          meta={"rank": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                                "target_modules": sorted(config.get("target_modules") or []),
                                "fine_tuning_job": job.id}))
            add_event(s, job.id, f"New fine-tuned model created: {job.fine_tuned_model}",
                      data={"trained_tokens": result.trained_tokens, "steps": result.step,
                            "train_loss": result.train_loss, "valid_loss": result.valid_loss,
                            "truncated_examples": result.truncated})
            add_event(s, job.id, "The job has successfully completed")
            webhooks.notify_fine_tuning(s, job.id, "succeeded")
        return "succeeded"

    def _finish(self, job: FineTuningJob, status: str, result: TrainingResult, message: str) -> str:
        with session_scope(self.sessions) as s:
            done = s.execute(update(FineTuningJob).where(*_held(job.id, self.worker_id)).values(
                status=status, finished_at=time.time(), lease_expires_at=None, trained_tokens=result.trained_tokens))
            if done.rowcount:  # type: ignore[attr-defined]
                add_event(s, job.id, f"{message} at step {result.step} of {result.total_steps}; "
                          "its checkpoints are kept")
                webhooks.notify_fine_tuning(s, job.id, status)
        return status

    def _fail(self, job: FineTuningJob, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"[:2000]
        with session_scope(self.sessions) as s:
            done = s.execute(update(FineTuningJob).where(*_held(job.id, self.worker_id)).values(
                status="failed", finished_at=time.time(), lease_expires_at=None,
                error={"code": ErrorCode.TRAINING_FAILED.value, "message": message, "param": None}))
            if done.rowcount:  # type: ignore[attr-defined]
                add_event(s, job.id, f"The job failed: {message}", level="error")
                webhooks.notify_fine_tuning(s, job.id, "failed")

    def _hand_back(self, job: FineTuningJob) -> None:
        """A stopping worker's job goes back to the queue (its attempt not counted) for another to resume."""
        with session_scope(self.sessions) as s:
            done = s.execute(update(FineTuningJob).where(*_held(job.id, self.worker_id)).values(
                status="queued", worker=None, lease_expires_at=None, published_at=None,
                attempts=FineTuningJob.attempts - 1))
            if done.rowcount:  # type: ignore[attr-defined]
                add_event(s, job.id, "The worker is shutting down: the job is queued again and resumes from its "
                          "last checkpoint", level="warn")
        ft_state.publish(self.sessions, self.publisher, job.id, job.model)  # else the upkeep sweep does

    # --- the lease loop's share ---

    def maintain(self, models: list[str]) -> None:
        """Renew the running job's lease (training renews it too, between steps: this covers a long
        step or validation pass); recover fine-tuning jobs of dead workers."""
        with session_scope(self.sessions) as s:
            if (job_id := self.running) is not None:
                s.execute(update(FineTuningJob).where(*_held(job_id, self.worker_id))
                          .values(lease_expires_at=time.time() + self.limits.lease_s))
            publish, failed = requeue_expired_training(s, models=models, max_attempts=self.limits.max_attempts)
        for job_id, model in publish:
            ft_state.publish(self.sessions, self.publisher, job_id, model)  # else the upkeep sweep does
        if publish or failed:
            log.warning("fine-tuning jobs of a dead worker: %d queued again, %d failed", len(publish), len(failed))
